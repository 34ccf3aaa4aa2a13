package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat: 100 on every Linux
// architecture Go supports.
const clockTicks = 100

// proc is a child process the suite started, with its output in files of the work dir.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  string // path of its stdout
	errf string // path of its stderr
	done chan struct{}
	err  error // once done is closed
}

// startProc starts argv with extra environment variables. The child gets SIGKILL if the suite
// dies, so that nothing outlives a killed run.
func startProc(name, dir string, env []string, argv ...string) (*proc, error) {
	p := &proc{name: name, out: filepath.Join(dir, name+".out"), errf: filepath.Join(dir, name+".err"), done: make(chan struct{})}
	stdout, err := os.Create(p.out)
	if err != nil {
		return nil, err
	}
	stderr, err := os.Create(p.errf)
	if err != nil {
		stdout.Close()
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		stdout.Close()
		stderr.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p.cmd = cmd
	go func() {
		p.err = cmd.Wait()
		stdout.Close()
		stderr.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits for the process to exit by itself, at most d.
func (p *proc) wait(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return p.err
	case <-t.C:
		return fmt.Errorf("%s still running after %v", p.name, d)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop asks the process to end with SIGTERM and kills it after grace.
func (p *proc) stop(grace time.Duration) {
	if p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// tail returns the last n bytes of the process's stderr, for error messages.
func (p *proc) tail(n int) string {
	b, _ := os.ReadFile(p.errf)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}

// usage is what the kernel says a process has used so far.
type usage struct {
	cpu time.Duration // user + system, all threads
	rss int64         // VmRSS, bytes
	hwm int64         // VmHWM, peak RSS, bytes
}

// usage reads /proc/PID/stat and /proc/PID/status; after the process exited, its rusage.
func (p *proc) usage() (usage, error) {
	if !p.exited() {
		u, err := procUsage(p.pid())
		if err == nil {
			return u, nil
		}
		if !p.exited() {
			return usage{}, err
		}
	}
	ru, ok := p.cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		return usage{}, errors.New("no rusage")
	}
	return usage{cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), hwm: ru.Maxrss * 1024}, nil
}

func procUsage(pid int) (usage, error) {
	var u usage
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, err
	}
	// The command name, in parentheses, may hold spaces: count fields after its end.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return u, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return u, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return u, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	u.cpu = time.Duration(utime+stime) * time.Second / clockTicks
	status, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	defer status.Close()
	sc := bufio.NewScanner(status)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return u, fmt.Errorf("/proc/%d/status %s: %w", pid, k, err)
		}
		if k == "VmRSS" {
			u.rss = kb << 10
		} else {
			u.hwm = kb << 10
		}
	}
	return u, sc.Err()
}

// machineCPU is the CPU time every core of the machine has spent busy (not idle, not waiting
// for I/O) since boot, from /proc/stat.
func machineCPU() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return 0
	}
	var busy int64
	for i, v := range f[1:] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0
		}
		// user nice system idle iowait irq softirq steal guest guest_nice; guest time is
		// already counted in user.
		if i == 3 || i == 4 || i >= 8 {
			continue
		}
		busy += n
	}
	return time.Duration(busy) * time.Second / clockTicks
}

// selfCPU is this process's CPU time so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// settle waits until the process has used less than 5% of a core over half a second, at most
// max, so that a measurement does not start while the previous one is still being cleaned
// up (connections closing, garbage collection).
func settle(ctx context.Context, p *proc, max time.Duration) {
	deadline := time.Now().Add(max)
	prev, err := p.usage()
	for err == nil && time.Now().Before(deadline) {
		if sleep(ctx, 500*time.Millisecond) != nil {
			return
		}
		u, e := p.usage()
		if e != nil || u.cpu-prev.cpu < 25*time.Millisecond {
			return
		}
		prev, err = u, e
	}
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// raiseFileLimit lifts the soft limit on open files to the hard one. Go programs do this for
// themselves at start; it is set explicitly here so that children that are not Go (bsdiff)
// and the suite's own 10,000 storm connections get it too.
func raiseFileLimit() (uint64, error) {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0, err
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
			return 0, err
		}
	}
	return rl.Cur, nil
}

// run runs a command to completion under a timeout and returns its stdout.
func run(ctx context.Context, timeout time.Duration, env []string, argv ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 2000 {
			msg = msg[len(msg)-2000:]
		}
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", filepath.Base(argv[0]), strings.Join(argv[1:min(len(argv), 3)], " "), err, msg)
	}
	return stdout.Bytes(), nil
}
