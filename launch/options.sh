# Sourced by the launch scripts: their usage text, option parsing and common checks.

# The calling script's header comment, from line 2 to the line before `set -euo`.
usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

usage_error() {
  echo "error: $1" >&2
  usage >&2
  exit 2
}

# parse_options "OPT:VAR ..." HINT ARGS...: sets VAR to the value after each OPT; -h/--help
# prints the usage; what follows -- is left in the array `rest`. HINT ends the message for an
# unknown option (where its flags go).
parse_options() {
  local spec=$1 hint=$2 pair var
  shift 2
  rest=()
  while [ $# -gt 0 ]; do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --) shift; rest=("$@"); return ;;
    esac
    var=""
    for pair in $spec; do
      [ "${pair%%:*}" = "$1" ] && var=${pair#*:}
    done
    [ -n "$var" ] || usage_error "unknown option $1 ($hint)"
    [ $# -ge 2 ] || usage_error "$1 needs a value"
    printf -v "$var" '%s' "$2"
    shift 2
  done
}

# require_positive OPT VALUE [OPT VALUE ...]: each VALUE a positive integer.
require_positive() {
  while [ $# -gt 0 ]; do
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "$1 takes a positive integer (got '$2')"
    shift 2
  done
}

require_jq() {
  command -v jq >/dev/null || usage_error "$(basename "$0") needs jq (apt-get install jq)"
}

# Brings ${BUILD_DIR:-build} up to date (quietly) unless RINGATTN_NO_BUILD=1.
build_unless_told() {
  if [ "${RINGATTN_NO_BUILD:-0}" != 1 ]; then
    BUILD_DIR=${BUILD_DIR:-build} bash launch/build.sh >/dev/null
  fi
}
