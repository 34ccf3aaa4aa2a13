package main

import (
	"encoding/json"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/fota-dev/fota"

// TestDependencyRules enforces DESIGN.md's rules on which of our packages may import which,
// for the code and for its tests: protocol and atomicfile are leaves on the standard library
// (devices import both), the broker never reaches the controller, and the device simulator is a
// device that only talks MQTT.
func TestDependencyRules(t *testing.T) {
	forbidden := map[string][]string{
		"protocol":   {"*"},
		"atomicfile": {"*"},
		"fotatest":   {"*"}, // test helpers any package may use, the device side's included
		"broker":     {"controller", "api", "devicesim"},
		"devicesim":  {"broker", "controller", "api"},
		"controller": {"broker", "api", "devicesim"},
		"firmware":   {"broker", "controller", "api", "devicesim"},
		"certs":      {"broker", "controller", "api", "devicesim", "firmware"},
		"api":        {"broker", "devicesim"},
	}
	pkgs := listPackages(t)
	for name, banned := range forbidden {
		p, ok := pkgs[module+"/"+name]
		if !ok {
			t.Errorf("package %s not found by go list", name)
			continue
		}
		for _, dep := range p.all() {
			if !strings.HasPrefix(dep, module+"/") && dep != module {
				if slices.Contains(banned, "*") && strings.Contains(strings.SplitN(dep, "/", 2)[0], ".") {
					t.Errorf("%s imports %s, want the standard library only", name, dep)
				}
				continue
			}
			rel := strings.TrimPrefix(dep, module+"/")
			if rel == name {
				continue // its own external tests
			}
			for _, b := range banned {
				if b == "*" || rel == b || strings.HasPrefix(rel, b+"/") {
					t.Errorf("%s depends on %s, which DESIGN.md forbids", name, rel)
				}
			}
		}
	}
}

type goPackage struct {
	ImportPath   string
	Deps         []string
	TestImports  []string
	XTestImports []string
}

// all is every package p depends on, transitively for its code and directly for its tests.
func (p goPackage) all() []string {
	out := append([]string{}, p.Deps...)
	out = append(out, p.TestImports...)
	return append(out, p.XTestImports...)
}

func listPackages(t *testing.T) map[string]goPackage {
	t.Helper()
	cmd := exec.Command("go", "list", "-json", "./...")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("go list: %v", err)
	}
	pkgs := make(map[string]goPackage)
	dec := json.NewDecoder(out)
	for {
		var p goPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("decode go list output: %v", err)
		}
		pkgs[p.ImportPath] = p
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("go list: %v", err)
	}
	return pkgs
}
