# Shared set-up steps for scripts/demo and .ci/run (sourced, not executed).
# Each step is idempotent: a second run reuses what the first installed.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

# install_system_packages PACKAGE...: apt-get install whichever of them is missing.
install_system_packages() {
  local wanted=("$@") missing=() package
  for package in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$package")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "system packages present: ${wanted[*]}"
    return 0
  fi
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq || return $?
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

python_for_venv() {
  local candidate
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null \
      && "$candidate" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no Python >= 3.11 with ensurepip found (apt-get install python3.11-venv)" >&2
  return 1
}

create_venv() {
  if [ -x .venv/bin/python ]; then
    echo "reusing .venv ($(.venv/bin/python --version))"
    return 0
  fi
  local python
  python="$(python_for_venv)" || return $?
  "$python" -m venv .venv
}

# install_project: pip install -e '.[dev]' unless pyproject.toml is unchanged since the last one.
install_project() {
  local stamp=.venv/.certautopilot-installed
  if [ -f "$stamp" ] && [ "$(sha256sum pyproject.toml)" = "$(cat "$stamp")" ]; then
    echo "project already installed in .venv (pyproject.toml unchanged)"
    return 0
  fi
  echo "installing the project into .venv (log: .venv/pip-install.log)"
  # pip's build chatter (setuptools' editable-install notice) goes to the log; on a failure
  # its tail is shown.
  if ! { PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip install -q --upgrade pip \
      && PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip install -q -e '.[dev]'; } \
      > .venv/pip-install.log 2>&1; then
    tail -n 40 .venv/pip-install.log >&2
    return 1
  fi
  sha256sum pyproject.toml > "$stamp"
}

# test_binaries: find or build kube-apiserver and etcd (prints build progress when it builds).
test_binaries() {
  [ -d /usr/local/go/bin ] && export PATH="$PATH:/usr/local/go/bin"
  if [ -z "${KUBEBUILDER_ASSETS:-}" ] && ! command -v go >/dev/null; then
    if ! .venv/bin/python -c 'import os
from tests.testenv.binaries import find_binaries
find_binaries(os.environ, build=False)' 2>/dev/null; then
      echo "Go is needed to build kube-apiserver and etcd once (or set KUBEBUILDER_ASSETS)" >&2
      return 1
    fi
  fi
  .venv/bin/python -m tests.testenv binaries
}
