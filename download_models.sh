#!/usr/bin/env bash
# Fetch the paper's checkpoints into checkpoints/ and the FID reference statistics into fid_stats/.
# Usage: bash download_models.sh [edm|var|xar|imm|neon|fid|all]   (default: all; files already present are kept)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p checkpoints fid_stats
what="${1:-all}"

fetch() {  # fetch URL DIR: download once, atomically (a .part file renamed when complete)
  local url="$1" dir="$2" name
  name="$(basename "${url%%\?*}")"
  if [ -f "$dir/$name" ]; then echo "ok   $dir/$name"; return; fi
  echo "get  $dir/$name"
  curl -fL --retry 3 -o "$dir/$name.part" "$url" && mv "$dir/$name.part" "$dir/$name"
}

hf_fetch() {  # hf_fetch REPO FILE DIR: one file of a Hugging Face model repository
  local repo="$1" file="$2" dir="$3"
  if [ -f "$dir/$file" ]; then echo "ok   $dir/$file"; return; fi
  echo "get  $dir/$file ($repo)"
  python -c "import sys; from huggingface_hub import hf_hub_download as get; get(sys.argv[1], sys.argv[2], local_dir=sys.argv[3])" \
    "$repo" "$file" "$dir"
}

if [[ "$what" == all || "$what" == edm ]]; then
  for net in edm-cifar10-32x32-cond-vp edm-cifar10-32x32-uncond-vp edm-ffhq-64x64-uncond-vp; do
    fetch "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/$net.pkl" checkpoints
  done
fi
if [[ "$what" == all || "$what" == var ]]; then
  for file in vae_ch160v4096z32.pth var_d16.pth var_d36.pth; do hf_fetch FoundationVision/var "$file" checkpoints; done
fi
if [[ "$what" == all || "$what" == xar ]]; then  # xAR-B/L (OliverRensu/xAR) and MAR's KL-16 VAE
  for file in xAR-B.pth xAR-L.pth; do hf_fetch OliverRen/xAR "$file" checkpoints; done
  hf_fetch xwen99/mar-vae-kl16 kl16.ckpt checkpoints
fi
if [[ "$what" == all || "$what" == imm ]]; then  # IMM's base and the SD-VAE ft-EMA as a diffusers folder
  hf_fetch lumaai/imm imagenet256_ts_a2.pkl checkpoints
  for file in config.json diffusion_pytorch_model.safetensors; do
    hf_fetch stabilityai/sd-vae-ft-ema "$file" checkpoints/sd-vae-ft-ema
  done
fi
if [[ "$what" == all || "$what" == neon ]]; then  # the authors' Neon checkpoints
  for file in Neon_EDM_conditional_CIFAR10.pkl Neon_EDM_unconditional_CIFAR10.pkl Neon_EDM_FFHQ.pkl \
              Neon_VARd16_imagenet256.pth Neon_VARd36_imagenet512.pth Neon_xARL_imagenet256.pth \
              Neon_xARB_imagenet256.pth Neon_imm_imagenet256.pkl; do
    hf_fetch sinaalemohammad/Neon "$file" checkpoints
  done
fi
if [[ "$what" == all || "$what" == fid ]]; then
  for ref in cifar10-32x32 ffhq-64x64; do fetch "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/$ref.npz" fid_stats; done
  for file in adm_in256_stats.npz adm_in512_stats.npz; do hf_fetch sinaalemohammad/Neon "$file" fid_stats; done
  fetch "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth" checkpoints
fi
echo "done: checkpoints/ and fid_stats/"
