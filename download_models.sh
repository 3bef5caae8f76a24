#!/usr/bin/env bash
# Fetch what the eight paper rows need: the bases, codecs and VAEs and the authors' Neon checkpoints into
# checkpoints/, the FID reference statistics into fid_stats/, the Inception weights into checkpoints/.
#
# Usage: bash download_models.sh [edm|var|xar|imm|neon|fid|all]   (default: all)
#        bash download_models.sh --verify                          (re-check every downloaded file)
#
# - Files already present are kept. A download goes to NAME.part and is renamed when complete; an
#   interrupted one resumes from its .part (curl -C -) when the script runs again.
# - Each completed file's sha256 is recorded in checkpoints/SHA256SUMS or fid_stats/SHA256SUMS
#   (sha256sum's format; a file found already present is recorded as found). --verify re-checks every
#   recorded file against it and exits 1 naming each missing or changed file.
# - Environment: HF_ENDPOINT (default https://huggingface.co) for the Hugging Face files; HF_TOKEN for
#   gated ones (sent to HF_ENDPOINT only, never to a mirror); NEON_DOWNLOAD_MIRROR (e.g. http://host:8000)
#   to fetch every URL https://HOST/PATH from MIRROR/HOST/PATH instead (offline mirrors; the tests use it).
set -euo pipefail
cd "$(dirname "$0")"
HF="${HF_ENDPOINT:-https://huggingface.co}"

sha256() {  # sha256 ARGS...: sha256sum, or shasum -a 256 where coreutils is missing (macOS)
  if command -v sha256sum > /dev/null; then sha256sum "$@"; else shasum -a 256 "$@"; fi
}

record() {  # record ROOT REL: set REL's line of ROOT/SHA256SUMS to the sha256 of ROOT/REL
  local root="$1" rel="$2" sum
  sum="$(cd "$root" && sha256 "$rel")"
  { [ -f "$root/SHA256SUMS" ] && awk -v name="$rel" '$2 != name' "$root/SHA256SUMS"; echo "$sum"; } \
    > "$root/SHA256SUMS.tmp"
  mv "$root/SHA256SUMS.tmp" "$root/SHA256SUMS"
}

fetch() {  # fetch URL ROOT [SUBDIR]: download URL once into ROOT[/SUBDIR], resumable, and record its sha256
  local url="$1" root="$2" sub="${3:-}" rel dest
  rel="${sub:+$sub/}$(basename "${url%%\?*}")"
  dest="$root/$rel"
  if [ -f "$dest" ]; then
    if [ -f "$root/SHA256SUMS" ] && awk -v n="$rel" '$2 == n {found = 1} END {exit !found}' "$root/SHA256SUMS"; then
      echo "ok   $dest"
    else
      record "$root" "$rel"
      echo "ok   $dest (found; sha256 recorded)"
    fi
    return
  fi
  if [ -n "${NEON_DOWNLOAD_MIRROR:-}" ]; then url="${NEON_DOWNLOAD_MIRROR%/}/${url#*://}"; fi
  local auth=()
  if [ -n "${HF_TOKEN:-}" ] && [[ "$url" == "$HF"/* ]]; then auth=(-H "Authorization: Bearer $HF_TOKEN"); fi
  mkdir -p "$(dirname "$dest")"
  if [ -s "$dest.part" ]; then
    echo "get  $dest (resuming after $(wc -c < "$dest.part" | tr -d ' ') bytes)"
  else
    echo "get  $dest"
  fi
  local status=0
  curl -fL --retry 3 -C - ${auth[@]+"${auth[@]}"} -o "$dest.part" "$url" || status=$?
  if [ "$status" -eq 33 ]; then  # the server cannot resume (no range requests): start again
    echo "get  $dest (the server cannot resume: from the start)"
    rm -f "$dest.part"
    status=0
    curl -fL --retry 3 ${auth[@]+"${auth[@]}"} -o "$dest.part" "$url" || status=$?
  fi
  if [ "$status" -ne 0 ]; then
    local hint=""
    if [ -s "$dest.part" ]; then hint="; run again to resume from $dest.part"; fi
    echo "error: could not download $url (curl exit $status$hint)" >&2
    exit 1
  fi
  mv "$dest.part" "$dest"
  record "$root" "$rel"
}

hf() {  # hf REPO FILE ROOT [SUBDIR]: one file of a Hugging Face model repository
  fetch "$HF/$1/resolve/main/$2" "$3" "${4:-}"
}

verify() {  # re-check every file recorded in checkpoints/SHA256SUMS and fid_stats/SHA256SUMS
  local root bad=0 checked=0 failures
  for root in checkpoints fid_stats; do
    [ -f "$root/SHA256SUMS" ] || continue
    checked=1
    if failures="$(cd "$root" && sha256 -c SHA256SUMS 2>&1)"; then
      echo "ok   $root: $(wc -l < "$root/SHA256SUMS" | tr -d ' ') files match $root/SHA256SUMS"
    else
      bad=1
      grep ': FAILED' <<< "$failures" | sed "s|^|$root/|" >&2 || true
    fi
  done
  if [ "$checked" = 0 ]; then
    echo "error: no checkpoints/SHA256SUMS or fid_stats/SHA256SUMS to verify: download first" >&2
    exit 1
  fi
  if [ "$bad" = 1 ]; then
    echo "error: the files above do not match the sha256 recorded when they were downloaded (or are missing):" \
         "delete them and run download_models.sh again" >&2
    exit 1
  fi
}

what="${1:-all}"
case "$what" in
  --verify) verify; exit 0 ;;
  edm|var|xar|imm|neon|fid|all) ;;
  *) echo "usage: bash download_models.sh [edm|var|xar|imm|neon|fid|all] | --verify" >&2; exit 2 ;;
esac
mkdir -p checkpoints fid_stats

if [[ "$what" == all || "$what" == edm ]]; then
  for net in edm-cifar10-32x32-cond-vp edm-cifar10-32x32-uncond-vp edm-ffhq-64x64-uncond-vp; do
    fetch "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/$net.pkl" checkpoints
  done
fi
if [[ "$what" == all || "$what" == var ]]; then
  for file in vae_ch160v4096z32.pth var_d16.pth var_d36.pth; do hf FoundationVision/var "$file" checkpoints; done
fi
if [[ "$what" == all || "$what" == xar ]]; then  # xAR-B/L (OliverRensu/xAR) and MAR's KL-16 VAE
  for file in xAR-B.pth xAR-L.pth; do hf OliverRen/xAR "$file" checkpoints; done
  hf xwen99/mar-vae-kl16 kl16.ckpt checkpoints
fi
if [[ "$what" == all || "$what" == imm ]]; then  # IMM's base and the SD-VAE ft-EMA as a diffusers folder
  hf lumaai/imm imagenet256_ts_a2.pkl checkpoints
  for file in config.json diffusion_pytorch_model.safetensors; do
    hf stabilityai/sd-vae-ft-ema "$file" checkpoints sd-vae-ft-ema
  done
fi
if [[ "$what" == all || "$what" == neon ]]; then  # the authors' Neon checkpoints
  for file in Neon_EDM_conditional_CIFAR10.pkl Neon_EDM_unconditional_CIFAR10.pkl Neon_EDM_FFHQ.pkl \
              Neon_VARd16_imagenet256.pth Neon_VARd36_imagenet512.pth Neon_xARL_imagenet256.pth \
              Neon_xARB_imagenet256.pth Neon_imm_imagenet256.pkl; do
    hf sinaalemohammad/Neon "$file" checkpoints
  done
fi
if [[ "$what" == all || "$what" == fid ]]; then
  for ref in cifar10-32x32 ffhq-64x64; do fetch "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/$ref.npz" fid_stats; done
  for file in adm_in256_stats.npz adm_in512_stats.npz; do hf sinaalemohammad/Neon "$file" fid_stats; done
  fetch "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth" checkpoints
fi
echo "done: checkpoints/ and fid_stats/ (bash download_models.sh --verify re-checks them)"
