# Shared by the recipes' run.sh scripts (sourced, not run): options, smoke mode, dry runs.
#
#   run.sh              the real run: real models from the Hub, a GPU, settings from the environment
#   run.sh --smoke      the same commands with tiny settings on a tiny pipeline (CPU, about a minute);
#                       MODEL may name a tiny pipeline folder, otherwise one is built in $OUT
#   run.sh --dry-run    print the commands without running them (combine with --smoke)
#
# Every command is printed before it runs as "+ cmd args...", quoted so that it can be pasted
# into a shell; tests/test_examples.py reads these lines to check each flag against the parser of
# the script it is passed to.

set -euo pipefail

EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$EXAMPLES_DIR")"
# The recipes call the repository's scripts and duo_plugin as they are in this checkout.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
SMOKE="${SMOKE:-0}"
DRY_RUN="${DRY_RUN:-0}"

parse_recipe_flags() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --smoke) SMOKE=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        # The recipe's header comment is its help.
        sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$0"
        exit 0
        ;;
      *)
        echo "error: unknown option $arg: use --smoke, --dry-run or --help (settings come from environment variables)" >&2
        exit 2
        ;;
    esac
  done
  # One process: the training's effective batch is then the official 4 pairs (1 pair x 4 accumulated
  # steps); a launcher with N processes takes N times as many pairs per step (see examples/multi_gpu).
  # Precision is set by each script's own flags. --quiet: a refusal is the last line shown, without
  # accelerate's CalledProcessError traceback after it.
  read -r -a LAUNCH <<< "${LAUNCH:-accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no}"
}

# Print a command, then run it (unless this is a dry run).
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
  fi
}

fail() {
  echo "error: $*" >&2
  exit 2
}

# A file the run needs later, checked now rather than after hours of training. A dry run prints the
# commands with a placeholder (YOUR_<NAME>) where the file is not given yet.
require_file() {
  local name="$1" hint="$2"
  local path="${!name:-}"
  if [[ -z "$path" && "$DRY_RUN" == 1 ]]; then
    printf -v "$name" 'YOUR_%s' "$name"
    return 0
  fi
  [[ -n "$path" ]] || fail "set $name: $hint"
  [[ "$DRY_RUN" == 1 || -e "$path" ]] || fail "$name=$path does not exist: $hint"
}

# A smoke run's tiny model: unless the variable NAME is already set (a folder of the user's), set it to
# FOLDER and build a tiny KIND there once: sd, sd3, clip or other_unet (see smoke_models.py).
#   smoke_model NAME KIND FOLDER
smoke_model() {
  local name="$1" kind="$2" folder="$3"
  [[ -n "${!name:-}" ]] && return 0
  printf -v "$name" '%s' "$folder"
  if [[ ! -e "$folder" ]]; then
    run "$PYTHON" "$EXAMPLES_DIR/smoke_models.py" --kind "$kind" --output "$folder"
  fi
}
