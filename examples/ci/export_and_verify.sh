#!/usr/bin/env bash
# Export a BottleFit checkpoint for the Jetson and the Raspberry Pi, verify every artifact (fidelity under reference
# semantics; the Pi's own kernels under arm64 emulation), and gather what CI uploads: one tarball per board bundle
# and every report.json. github-actions.yml runs it; it runs the same on a laptop or any other CI.
#
#   CHECKPOINT=best.pt OUT=dist examples/ci/export_and_verify.sh
#
# Environment (all optional but the model):
#   CHECKPOINT      the trained checkpoint (ours, torchdistill's or sc2bench's)
#   MODEL_ARGS      extra model options, e.g. "--arch custom_resnet152 --bottleneck-channel 12" for a bare state_dict,
#                   or "--untrained --arch mini_resnet" for a smoke run without a checkpoint
#   OUT             where everything goes (default dist/): export/, bundles/, reports/
#   CALIB           calibration images, a folder or .npz (default: the built-in photos)
#   JETSON_PROFILE  nano | xavier-nx | orin (default orin)
#   EMULATE         Pi boards to emulate (default pi4,pi5; "none" to skip)
#   BOTTLEFIT       the command (default: bottlefit)
# Exit code: 0 all verified, 1 a verification failed, 2 bad input; the bundles and reports are gathered either way
# (an export that failed parity as <target>.failed, beside the last passing <target>).
set -uo pipefail
shopt -s nullglob
BOTTLEFIT=${BOTTLEFIT:-bottlefit}
OUT=${OUT:-dist}
JETSON_PROFILE=${JETSON_PROFILE:-orin}
EMULATE=${EMULATE:-pi4,pi5}
read -r -a model <<< "${CHECKPOINT:-} ${MODEL_ARGS:-}"
calib=()
[ -n "${CALIB:-}" ] && calib=(--calib "$CALIB")
mkdir -p "$OUT/export" "$OUT/bundles" "$OUT/reports"

rc=0
step() {  # run one step; remember the worst exit code (2 beats 1) and go on, so reports are still gathered
  echo "::group::$*" >&2
  "$@"
  local r=$?
  echo "::endgroup::" >&2
  if [ "$r" -ne 0 ]; then
    echo "export_and_verify: '$*' exited $r" >&2
    if [ "$r" -gt "$rc" ]; then rc=$r; fi
  fi
  return 0
}
# shellcheck disable=SC2086
step $BOTTLEFIT export "${model[@]}" --target jetson --profile "$JETSON_PROFILE" --out "$OUT/export" "${calib[@]}"
# shellcheck disable=SC2086
step $BOTTLEFIT export "${model[@]}" --target rpi --out "$OUT/export" --emulate "$EMULATE" "${calib[@]}"
# The same verdicts again from the manifests alone: what a later job (or a reviewer) runs on the uploaded bundles.
# --strict: the built-in gates, whatever tolerance overrides a manifest records (manifests are not signed).
ckpt=()
[ -n "${CHECKPOINT:-}" ] && ckpt=(--checkpoint "$CHECKPOINT")
# shellcheck disable=SC2086
[ "$rc" -eq 0 ] && step $BOTTLEFIT verify "$OUT/export" --strict "${ckpt[@]}" --emulate "$EMULATE"

for d in "$OUT"/export/*/; do
  t=$(basename "$d")
  [ -f "$d/report.json" ] && cp "$d/report.json" "$OUT/reports/$t.report.json"
  # reproducible tarballs: sorted names, no timestamps or owners
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$OUT/export" -cf - "$t" \
    | gzip -n > "$OUT/bundles/$t.tar.gz"
done
echo "export_and_verify: exit $rc; bundles in $OUT/bundles, reports in $OUT/reports" >&2
exit "$rc"
