# Shared by the benchmark scripts: `source "$(dirname "$0")/../lib.sh"`.
# Sets $bin to the release `stampede` binary wherever cargo builds it (CARGO_TARGET_DIR
# is honoured) or to $STAMPEDE_BIN, and stops with a hint when it is missing.
bench_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target_dir=$(cd "$bench_root" && cargo metadata --format-version 1 --no-deps | sed -E 's/.*"target_directory":"([^"]+)".*/\1/')
bin=${STAMPEDE_BIN:-$target_dir/release/stampede}
[ -x "$bin" ] || { echo "build it first: cargo build --release (looked for $bin)" >&2; exit 2; }

# needs_wrk: stops with an install hint when wrk is missing.
needs_wrk() { command -v wrk >/dev/null || { echo "needs wrk (Debian/Ubuntu: apt-get install wrk)" >&2; exit 2; }; }
