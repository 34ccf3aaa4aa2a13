GO      ?= go
BIN     ?= bin/fota
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: build test test-short demo lint static clean bench bench-quick bench-delta

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) .

# The whole suite under the race detector: real broker, real TLS, real bbolt.
test:
	$(GO) test -race -timeout 15m ./...

test-short:
	$(GO) test -short -race ./...

# Update 20 simulated devices end to end on the embedded firmware.
demo:
	$(GO) run . demo

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# A statically linked binary: cgo stays on (bsdiff needs it), the resolver and user lookups are
# pure Go, and the C parts are linked in statically.
static:
	CGO_ENABLED=1 $(GO) build -tags netgo,osusergo \
		-ldflags '$(LDFLAGS) -linkmode external -extldflags "-static"' -o bin/fota-static .
	@file bin/fota-static
	@ldd bin/fota-static || true

FIRMWARE ?= ../shared/firmware

# Delta patches against Debian's bsdiff and xdelta3 on real firmware: patch size, and time and
# peak memory (max RSS of each process) to make and to apply. Installs the two tools if missing.
bench-delta:
	command -v bsdiff >/dev/null && command -v xdelta3 >/dev/null || \
		{ apt-get update && apt-get install -y --no-install-recommends bsdiff xdelta3; }
	$(GO) run ./bench/delta -firmware $(FIRMWARE)

# The benchmark suite (bench/suite): each figure next to the alternative a user would pick,
# measured in the same run, written to BENCHMARKS.md. Long (tens of minutes); not part of test.
# Installs Debian's bsdiff and xdelta3, figure 4's baselines, if missing.
bench:
	command -v bsdiff >/dev/null && command -v xdelta3 >/dev/null || \
		{ apt-get update && apt-get install -y --no-install-recommends bsdiff xdelta3; }
	$(GO) run ./bench/suite -firmware $(FIRMWARE) -out BENCHMARKS.md -command 'make bench'

# The same code with small sizes and one repetition, in under 2 minutes; its report goes to bin/
# so that it does not replace the full one.
bench-quick:
	command -v bsdiff >/dev/null && command -v xdelta3 >/dev/null || \
		{ apt-get update && apt-get install -y --no-install-recommends bsdiff xdelta3; }
	$(GO) run ./bench/suite -quick -firmware $(FIRMWARE) -out bin/BENCHMARKS-quick.md -command 'make bench-quick'

clean:
	rm -rf bin
