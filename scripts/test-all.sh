#!/usr/bin/env bash
# The test command of VoiceMesh: `bash scripts/test-all.sh` from anywhere in the clone.
#
# On a fresh Debian 12 machine (as root, with rustup's Rust 1.95) it first installs what is
# missing — Debian packages, rustup components and the Cortex-M target, the Python venv of the
# third-party test peers, cargo-fuzz — then runs every check CI runs, in order, and stops at the
# first failure with a banner naming the step. Running it again installs nothing new.
#
# Environment:
#   CARGO_TARGET_DIR   respected (the release binary and the fuzz build go there too)
#   CI=true            builds with CARGO_INCREMENTAL=0
#   FUZZ_SECONDS       length of the fuzz smoke run (default 20)
#   SKIP_INSTALL=1     do not install anything; fail if something is missing
#   KEEP_GOING=1       run every step even after a failure; exit non-zero at the end if any failed
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

target_dir=${CARGO_TARGET_DIR:-$repo/target}
test_log=$target_dir/voicemesh-test-output.log
fuzz_seconds=${FUZZ_SECONDS:-20}
if [[ "${CI:-}" == "true" ]]; then
    export CARGO_INCREMENTAL=0
fi
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

# Debian packages the tests need (the build needs none: libjack and libasound are loaded at run
# time; the tests start jackd, use libasound2's null PCM, ptp4l, oscsend/oscdump, ip netns,
# systemd-analyze, python, node for node-rtpmidi).
apt_packages=(
    gcc libc6-dev libasound2 jackd2 iproute2
    python3 python3-venv linuxptp liblo-tools systemd ca-certificates
    qemu-system-arm binutils-arm-none-eabi
)

started=$(date +%s)
declare -a summary=() failed=()
current_step=""

banner() {
    printf '\n==================== %s ====================\n' "$*"
}

on_exit() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        printf '\n!!!!!!!!!!!!!!!!!!!! FAILED: %s (exit %d) !!!!!!!!!!!!!!!!!!!!\n' "${current_step:-setup}" "$rc" >&2
        for line in "${summary[@]}"; do printf '  %s\n' "$line" >&2; done
    fi
}
trap on_exit EXIT

# step NAME COMMAND...: runs one check with a banner and records its duration.
step() {
    local name=$1
    shift
    current_step=$name
    banner "$name"
    local t0 rc=0
    t0=$(date +%s)
    if [[ "${KEEP_GOING:-}" == 1 ]]; then
        # A subshell, so a failing `die` or command ends the step, not the script.
        ("$@") || rc=$?
    else
        "$@"
    fi
    local dt=$(($(date +%s) - t0))
    if [[ $rc -ne 0 ]]; then
        summary+=("FAIL  ${dt}s  $name (exit $rc)")
        failed+=("$name")
        printf -- '---- %s: FAILED (exit %d) in %ds\n' "$name" "$rc" "$dt"
        return 0
    fi
    summary+=("ok  ${dt}s  $name")
    printf -- '---- %s: ok in %ds\n' "$name" "$dt"
}

die() {
    printf 'test-all.sh: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Installation of what is missing
# ---------------------------------------------------------------------------------------------

apt_updated=0
apt_install() {
    [[ "${SKIP_INSTALL:-}" == 1 ]] && die "missing Debian packages: $* (SKIP_INSTALL=1)"
    command -v apt-get >/dev/null || die "missing packages $* and no apt-get: install them by hand"
    [[ $(id -u) -eq 0 ]] || die "missing Debian packages: $*; run as root or install them"
    if [[ $apt_updated -eq 0 ]]; then
        apt-get update
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

install_system_packages() {
    local missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "installing Debian packages: ${missing[*]}"
        apt_install "${missing[@]}"
    else
        echo "Debian packages: all present"
    fi
}

install_rust_parts() {
    command -v cargo >/dev/null ||
        die "no cargo: install Rust 1.95 with rustup (https://rustup.rs), then run this again"
    command -v rustup >/dev/null || die "no rustup: the checks need rustup's components and targets"
    local comps
    comps=$(rustup component list --installed)
    for c in rustfmt clippy; do
        if ! grep -q "^$c" <<<"$comps"; then
            [[ "${SKIP_INSTALL:-}" == 1 ]] && die "missing rustup component $c"
            rustup component add "$c"
        fi
    done
    # The Cortex-M7 target of the no_std builds. rustup cannot fetch it everywhere; then the
    # no_std step uses Debian's Rust with build-std instead (see docs/../PLATFORM notes).
    thumb_via=rustup
    if ! rustup target list --installed | grep -qx thumbv7em-none-eabihf; then
        if [[ "${SKIP_INSTALL:-}" == 1 ]] || ! rustup target add thumbv7em-none-eabihf; then
            echo "rustup could not add thumbv7em-none-eabihf: using Debian's rustc-web with build-std"
            thumb_via=debian
            local need=()
            for p in rustc-web cargo-web rust-web-src binutils-arm-none-eabi; do
                dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
            done
            [[ ${#need[@]} -eq 0 ]] || apt_install "${need[@]}"
        fi
    fi
    if ! command -v cargo-fuzz >/dev/null; then
        [[ "${SKIP_INSTALL:-}" == 1 ]] && die "missing cargo-fuzz"
        cargo install cargo-fuzz --locked
    fi
}

install_python_venv() {
    local venv=$repo/.venv stamp=$repo/.venv/.requirements.sha256 want
    want=$(sha256sum tests/requirements.txt | cut -d' ' -f1)
    if [[ -x $venv/bin/python && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        echo "Python venv: up to date ($venv)"
        return
    fi
    [[ "${SKIP_INSTALL:-}" == 1 ]] && die "Python venv missing or stale: $venv"
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r tests/requirements.txt
    echo "$want" >"$stamp"
    echo "Python venv: installed tests/requirements.txt into $venv"
}

# node-rtpmidi (npm `rtpmidi`, MIT), the RTP-MIDI test peer, into tests/peers/node_modules from
# the committed lock file. Its optional mDNS add-ons are native builds the tests do not use.
install_node_peers() {
    local dir=$repo/tests/peers stamp=$repo/tests/peers/node_modules/.lock.sha256 want
    # Debian's nodejs and npm, unless a node with npm is there already (NodeSource's nodejs
    # bundles npm and conflicts with Debian's npm package).
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        apt_install nodejs npm
    fi
    want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        echo "node test peers: up to date ($dir/node_modules)"
        return
    fi
    [[ "${SKIP_INSTALL:-}" == 1 ]] && die "node test peers missing or stale: $dir/node_modules"
    (cd "$dir" && npm ci --omit=optional --no-audit --no-fund)
    echo "$want" >"$stamp"
    echo "node test peers: installed from $dir/package-lock.json"
}

# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

no_std_build() {
    local crate=$1
    if [[ $thumb_via == rustup ]]; then
        cargo build -p "$crate" --no-default-features --target thumbv7em-none-eabihf --locked
    else
        # Debian's toolchain (PLATFORM notes): no rustup target, so core/alloc are built from
        # rust-web-src. Its own target dir keeps its artifacts apart from rustup's.
        env PATH=/usr/bin:/bin RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
            CARGO_TARGET_DIR="$target_dir/debian-rust" \
            /usr/bin/cargo build -p "$crate" --no-default-features \
            --target thumbv7em-none-eabihf -Z build-std=core,alloc --locked
    fi
}

# The firmwares (mcu-node/firmware/*, outside the workspace, each with its own Cargo.lock):
# built --locked from their own directories for thumbv7em-none-eabihf, with rustup's target or
# Debian's rustc-web + build-std (PLATFORM notes); linked with GNU ld (binutils-arm-none-eabi).
# They share one target dir under the workspace's (most of their dependencies are the same
# crates with the same features, built once). Prints the sizes; the Teensy's code must stay
# under 160 KiB of its 192 KiB ITCM. The QEMU image is what tests/tests/mcu_qemu.rs boots.
firmware_limit_teensy_text=$((160 * 1024))
firmware_target=$target_dir/firmware
firmware_elf() { echo "$firmware_target/thumbv7em-none-eabihf/release/voicemesh-fw-$1"; }
build_firmwares() {
    local fw
    for fw in qemu-an500 teensy41; do
        echo "--- firmware $fw"
        (
            cd "mcu-node/firmware/$fw"
            if [[ $thumb_via == rustup ]]; then
                CARGO_TARGET_DIR=$firmware_target cargo build --release --locked
            else
                env PATH=/usr/bin:/bin RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
                    CARGO_TARGET_DIR="$firmware_target" \
                    /usr/bin/cargo build --release --locked -Z build-std=core,alloc
            fi
        )
        arm-none-eabi-size "$(firmware_elf "$fw")"
    done
    local elf hex text
    elf=$(firmware_elf teensy41)
    hex=$firmware_target/voicemesh-fw-teensy41.hex
    arm-none-eabi-objcopy -O ihex "$elf" "$hex"
    text=$(arm-none-eabi-size -A "$elf" | awk '$1 == ".text" { print $2 }')
    [[ -n $text ]] || die "no .text section in $elf"
    echo "teensy41: .text (ITCM) $text bytes of $firmware_limit_teensy_text allowed (192 KiB ITCM); hex: $hex"
    ((text <= firmware_limit_teensy_text)) || die "Teensy firmware code is $text bytes, over the 160 KiB budget"
}

# Every systemd unit in deploy/: `systemd-analyze verify` (offline; the ExecStart binary is
# pointed at the freshly built one, which must exist for verify), where any diagnostic counts
# as a failure because verify exits 0 on unknown keys; plus a check of the keys we rely on.
validate_deploy() {
    local tmp units=()
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'; trap - RETURN" RETURN
    for unit in deploy/*.service; do
        units+=("$unit")
        local name
        name=$(basename "$unit")
        for key in '^\[Unit\]' '^Description=' '^\[Service\]' '^ExecStart=/usr/local/bin/voicemesh ' \
            '^LimitRTPRIO=' '^LimitMEMLOCK=' '^Restart=' '^\[Install\]' '^WantedBy=multi-user.target'; do
            grep -Eq "$key" "$unit" || die "$unit: no line matching $key"
        done
        sed "s|/usr/local/bin/voicemesh|$target_dir/release/voicemesh|" "$unit" >"$tmp/$name"
    done
    [[ ${#units[@]} -ge 2 ]] || die "expected the coordinator and node units in deploy/"
    grep -q '^ExecStart=/usr/local/bin/voicemesh coordinator --lan --state-dir /var/lib/voicemesh$' \
        deploy/voicemesh-coordinator.service || die "coordinator unit: unexpected ExecStart"
    grep -q '^ExecStart=/usr/local/bin/voicemesh node --lan --name %H --audio jack$' \
        deploy/voicemesh-node.service || die "node unit: unexpected ExecStart"
    # The units' command lines must parse with the real binary (clap rejects an unknown
    # argument before it honours a later --help).
    "$target_dir/release/voicemesh" coordinator --lan --state-dir /var/lib/voicemesh --help >/dev/null ||
        die "the coordinator unit's arguments do not parse"
    "$target_dir/release/voicemesh" node --lan --name host --audio jack --help >/dev/null ||
        die "the node unit's arguments do not parse"
    if command -v systemd-analyze >/dev/null; then
        local out
        out=$(systemd-analyze verify "$tmp"/*.service 2>&1) || { echo "$out"; die "systemd-analyze verify failed"; }
        if [[ -n $out ]]; then
            echo "$out"
            die "systemd-analyze verify reported problems"
        fi
        echo "systemd-analyze verify: ${#units[@]} units clean"
    else
        echo "systemd-analyze not available: checked required keys only"
    fi
}

run_tests() {
    export VOICEMESH_BIN=$target_dir/release/voicemesh
    export VOICEMESH_PYTHON=$repo/.venv/bin/python
    VOICEMESH_FW_QEMU=$(firmware_elf qemu-an500)
    export VOICEMESH_FW_QEMU
    [[ -x $VOICEMESH_BIN ]] || die "release binary missing: $VOICEMESH_BIN"
    : > "$test_log"
    # Tests that judge real-time behaviour (xruns, onsets, detection within 300 ms) run one at a
    # time after the rest, so parallel builds and tests on a 2-core machine cannot starve them.
    local timed='binary(sync_cluster) | binary(jack_node) | binary(jack_backend) | binary(failover) | binary(demo) | binary(processes) | binary(ptp_loopback) | binary(ptp_linuxptp) | binary(ptp_holdover) | binary(mcu_qemu) | binary(mcu_sim) | binary(rtpmidi_peers) | binary(rtpmidi_flood) | binary(jack_midi) | binary(link_interop) | binary(link_cv_clock) | binary(osc_peers) | binary(osc_flood)'
    if command -v cargo-nextest >/dev/null; then
        cargo nextest run --workspace --locked --no-fail-fast -E "not ($timed)" 2>&1 | tee -a "$test_log"
        cargo nextest run --workspace --locked --no-fail-fast -E "$timed" --test-threads 1 2>&1 | tee -a "$test_log"
        # nextest does not run doctests.
        cargo test --workspace --locked --doc 2>&1 | tee -a "$test_log"
    else
        cargo test --workspace --locked --no-fail-fast -- --test-threads 1 2>&1 | tee -a "$test_log"
    fi
    # The firmware's codec path: serde without `alloc`, so decoding may allocate nothing.
    cargo test -p voicemesh-protocol --no-default-features --locked --test allocations 2>&1 | tee -a "$test_log"
}

# Adds up what the test runners reported: nextest's summary and libtest's result lines.
count_tests() {
    local passed=0 failed=0 p f
    while read -r p f; do
        passed=$((passed + p)); failed=$((failed + f))
    done < <(
        sed -n -E 's/.*[0-9]+ tests? run: ([0-9]+) passed(, ([0-9]+) failed)?.*/\1 \3/p' "$test_log" | awk '{print $1, ($2==""?0:$2)}'
        sed -n -E 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' "$test_log"
    )
    printf '%d %d\n' "$passed" "$failed"
}

fuzz_smoke() {
    local target=$1 seconds=${2:-$fuzz_seconds} corpus
    corpus=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$corpus'; trap - RETURN" RETURN
    python3 fuzz/seed_corpus.py "$corpus" "$target"
    (
        cd fuzz
        if rustup toolchain list | grep -q '^nightly'; then
            cargo +nightly fuzz run "$target" "$corpus" -- -max_total_time="$seconds"
        else
            RUSTC_BOOTSTRAP=1 cargo +stable fuzz run "$target" "$corpus" -- -max_total_time="$seconds"
        fi
    )
}

current_step="install"
banner "install what is missing"
install_system_packages
install_rust_parts
install_python_venv
install_node_peers

step "cargo fmt --check" cargo fmt --all -- --check
step "clippy -D warnings" cargo clippy --workspace --all-targets --locked -- -D warnings
step "rustdoc -D warnings" env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
step "no_std build: voicemesh-protocol (thumbv7em, via $thumb_via)" no_std_build voicemesh-protocol
step "no_std build: voicemesh-mcu (thumbv7em, via $thumb_via)" no_std_build voicemesh-mcu
step "firmware builds (qemu-an500, teensy41) and the Teensy size gate" build_firmwares
step "release binary" cargo build --release --locked --bin voicemesh
step "deploy/ units" validate_deploy
step "tests" run_tests
step "fuzz smoke: decode_frame ${fuzz_seconds}s" fuzz_smoke decode_frame
step "fuzz smoke: decode_datagram ${fuzz_seconds}s" fuzz_smoke decode_datagram
step "fuzz smoke: link_wire 10s" fuzz_smoke link_wire 10
step "fuzz smoke: rtpmidi 10s" fuzz_smoke rtpmidi 10
step "fuzz smoke: osc 10s" fuzz_smoke osc 10

current_step=""
banner "summary"
for line in "${summary[@]}"; do printf '  %s\n' "$line"; done
if [[ ${#failed[@]} -gt 0 ]]; then
    current_step="${failed[*]}"
    printf '%d STEP(S) FAILED in %ds: %s\n' "${#failed[@]}" "$(($(date +%s) - started))" "${failed[*]}"
    exit 1
fi
printf 'ALL CHECKS PASSED in %ds\n' "$(($(date +%s) - started))"
read -r n_passed n_failed < <(count_tests)
printf 'tests: %d passed, %d failed\n' "$n_passed" "$n_failed"
