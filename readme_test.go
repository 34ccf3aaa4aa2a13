package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestReadmeUseIt runs the command block of README.md's "Use it" section as written, one
// command after the other, against the real binary and a real server. What a test machine
// cannot share is substituted, nothing else: /etc/fota/certs and /var/lib/fota become
// directories under a temp dir, which is also the working directory (so bin/fota is the binary,
// built once, and primehub-*.bin the demo firmware); the server listens on ports of its own on
// 127.0.0.1 and the CLI is pointed at them; `make build` is the test's build. Every command must
// exit 0; `rollout watch` is stopped with Ctrl-C after its first frame, as an operator would.
func TestReadmeUseIt(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary, runs a server and 50 simulated devices")
	}
	cmds := useItCommands(t, "README.md")
	dir := t.TempDir()
	if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "bin", "fota"), ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, v := range []string{"7.27.0", "7.28.0"} {
		if err := os.WriteFile(filepath.Join(dir, "primehub-"+v+".bin"), demoImage(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	paths := strings.NewReplacer("/etc/fota/certs", filepath.Join(dir, "etc/fota/certs"), "/var/lib/fota", filepath.Join(dir, "var/lib/fota"))
	vars := map[string]string{}
	env := func() []string {
		out := os.Environ()
		for k, v := range vars {
			out = append(out, k+"="+v)
		}
		return out
	}
	var mqttAddr string // the server's, once it runs
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	for _, line := range cmds {
		args := shellWords(t, paths.Replace(line), vars)
		background := len(args) > 0 && args[len(args)-1] == "&"
		if background {
			args = args[:len(args)-1]
		}
		switch {
		case len(args) == 0:
			continue
		case strings.Join(args, " ") == "make build":
			continue // built above
		case args[0] == "export":
			k, v, _ := strings.Cut(args[1], "=")
			vars[k] = v
			continue
		case args[0] != "bin/fota":
			t.Fatalf("README command %q: not a fota command; teach this test about it", line)
		}
		for i, a := range args {
			if a == "127.0.0.1:8883" && mqttAddr != "" {
				args[i] = mqttAddr
			}
		}
		if args[1] == "serve" {
			if !background {
				t.Fatalf("README command %q: serve runs in the background", line)
			}
			args = append(args, "--mqtt", "127.0.0.1:0", "--api", "127.0.0.1:0")
			var api string
			mqttAddr, api = startReadmeServer(t, dir, args, env())
			vars["FOTA_SERVER"] = "https://" + api
			continue
		}
		if background {
			t.Fatalf("README command %q: only serve is expected in the background", line)
		}
		cmd := exec.CommandContext(ctx, filepath.Join(dir, args[0]), args[1:]...)
		cmd.Dir, cmd.Env = dir, env()
		if len(args) > 2 && args[1] == "rollout" && args[2] == "watch" {
			runUntilFrame(t, line, cmd)
			continue
		}
		out, err := cmd.CombinedOutput()
		t.Logf("$ %s\n%s", line, out)
		if err != nil {
			t.Fatalf("README command %q: %v", line, err)
		}
	}
}

// useItCommands returns the commands of the first sh block after "## Use it" in path: comments
// dropped, continuation lines joined, commands split at ';'.
func useItCommands(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "\n## Use it\n")
	if !ok {
		t.Fatal(`README.md has no "## Use it" section`)
	}
	_, rest, ok = strings.Cut(rest, "```sh\n")
	block, _, ok2 := strings.Cut(rest, "```\n")
	if !ok || !ok2 {
		t.Fatal(`README.md's "Use it" section has no sh block`)
	}
	var cmds []string
	var cur strings.Builder
	for _, l := range strings.Split(block, "\n") {
		l = stripComment(l)
		if more, ok := strings.CutSuffix(strings.TrimRight(l, " "), `\`); ok {
			cur.WriteString(more + " ")
			continue
		}
		cur.WriteString(l)
		for _, c := range splitOutsideQuotes(cur.String(), ';') {
			if c = strings.TrimSpace(c); c != "" {
				cmds = append(cmds, c)
			}
		}
		cur.Reset()
	}
	if len(cmds) < 10 {
		t.Fatalf("got %d commands from README.md's Use it block, want its whole walk-through", len(cmds))
	}
	return cmds
}

// stripComment drops a '#' comment that starts a word outside quotes.
func stripComment(l string) string {
	quote := byte(0)
	for i := 0; i < len(l); i++ {
		switch c := l[i]; {
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case c == '"' || c == '\'':
			quote = c
		case c == '#' && (i == 0 || l[i-1] == ' ' || l[i-1] == '\t'):
			return l[:i]
		}
	}
	return l
}

func splitOutsideQuotes(s string, sep byte) []string {
	var out []string
	quote, start := byte(0), 0
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case c == '"' || c == '\'':
			quote = c
		case c == sep:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

var shellVar = regexp.MustCompile(`\$[A-Z_][A-Z0-9_]*`)

// shellWords splits a command as sh would for what the README uses: words, double and single
// quotes, and $VAR outside single quotes.
func shellWords(t *testing.T, s string, vars map[string]string) []string {
	t.Helper()
	expand := func(w string) string {
		return shellVar.ReplaceAllStringFunc(w, func(v string) string {
			if val, ok := vars[v[1:]]; ok {
				return val
			}
			return os.Getenv(v[1:])
		})
	}
	var words []string
	var w strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case ' ', '\t':
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		case '"', '\'':
			end := strings.IndexByte(s[i+1:], c)
			if end < 0 {
				t.Fatalf("unbalanced quote in %q", s)
			}
			q := s[i+1 : i+1+end]
			if c == '"' {
				q = expand(q)
			}
			w.WriteString(q)
			inWord = true
			i += end + 1
		default:
			j := i
			for j < len(s) && !strings.ContainsRune(" \t\"'", rune(s[j])) {
				j++
			}
			w.WriteString(expand(s[i:j]))
			inWord = true
			i = j - 1
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

// startReadmeServer starts `fota serve` and returns its MQTT and API addresses from the line
// it prints once it serves; the server is stopped with SIGTERM at the end of the test.
func startReadmeServer(t *testing.T, dir string, args, env []string) (mqtt, api string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(dir, args[0]), args[1:]...)
	cmd.Dir, cmd.Env = dir, env
	var stderr syncBuffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve: %v, want exit 0 after SIGTERM", err)
			}
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			t.Errorf("serve still running 20s after SIGTERM")
		}
		if t.Failed() {
			t.Logf("serve's log:\n%s", stderr.String())
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	m := regexp.MustCompile(`mqtts://(\S+), admin API https://(\S+),`).FindStringSubmatch(line)
	if err != nil || m == nil {
		t.Fatalf("serve: got %q (%v), want the serving line\n%s", line, err, stderr.String())
	}
	go io.Copy(io.Discard, stdout)
	return m[1], m[2]
}

// runUntilFrame runs an interactive command until it has drawn something, then stops it with
// Ctrl-C (SIGINT); it must exit 0.
func runUntilFrame(t *testing.T, line string, cmd *exec.Cmd) {
	t.Helper()
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "\nwave 1") {
		select {
		case err := <-done:
			t.Fatalf("README command %q ended before drawing a frame: %v\n%s", line, err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatalf("README command %q drew no frame in 30s:\n%s", line, out.String())
		}
	}
	cmd.Process.Signal(syscall.SIGINT)
	if err := <-done; err != nil {
		t.Fatalf("README command %q after Ctrl-C: %v, want exit 0\n%s", line, err, out.String())
	}
	t.Logf("$ %s\n%s", line, out.String())
}

// syncBuffer is a bytes.Buffer that a process writes while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
