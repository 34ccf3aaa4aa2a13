GO      ?= go
BIN     ?= bin/fota
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: build test test-short demo lint static clean

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

clean:
	rm -rf bin
