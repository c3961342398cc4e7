"""What batch invariance costs on this CPU: the SD1.5 UNet (random weights) called once on a CFG batch of B
images (2B rows) against B calls of 2 rows each, as the engine does on CPU (engine/sd/rows.py), and whether
image k of the batch then equals the same image alone.

    .venv/bin/python bench/batch_invariance.py --size 256 --batch 4 --repeat 2
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import UNet2DConditionModel

from sdstudio.engine.sd.rows import per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size / 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=8).eval()
    side, rows = args.size // 8, 2 * args.batch
    x, context = torch.randn(rows, 4, side, side), torch.randn(rows, 77, 768)

    def call(sample: torch.Tensor, **kw) -> torch.Tensor:
        return unet(sample, 500, **kw).sample

    with torch.inference_mode():
        timings = {}
        for name, images in (("batched", 1), ("per image", args.batch)):
            per_image(call, x, {"encoder_hidden_states": context}, images)  # warm-up
            start = time.perf_counter()
            for _ in range(args.repeat):
                out = per_image(call, x, {"encoder_hidden_states": context}, images)
            timings[name] = ((time.perf_counter() - start) / args.repeat, out)
        alone = call(x[0::args.batch], encoder_hidden_states=context[0::args.batch])  # image 0 made alone
    (batched, out_b), (single, out_p) = timings["batched"], timings["per image"]
    print(f"SD1.5 UNet, {args.size}x{args.size}, batch {args.batch} with CFG ({rows} rows), "
          f"{torch.get_num_threads()} threads")
    print(f"batched   {batched:.3f} s/step   image 0 vs alone: max |diff| "
          f"{float((out_b[0::args.batch] - alone).abs().max()):.3g}")
    print(f"per image {single:.3f} s/step   image 0 vs alone: max |diff| "
          f"{float((out_p[0::args.batch] - alone).abs().max()):.3g}")
    print(f"per image / batched: {single / batched:.3f}")


if __name__ == "__main__":
    main()
