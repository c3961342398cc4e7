"""The seeds' chain as one script: text2image -> inpaint -> refiner -> image2image, on one engine that keeps
every stage's model loaded, so each is loaded once.

    python examples/chain.py                      # the bundled demo models: offline, a few seconds on a CPU
    python examples/chain.py --model sd_xl_base_1.0 --inpaint-model sdxl-inpaint --refiner sd_xl_refiner_1.0 \\
        --size 1024 --steps 30 --prompt "..." --inpaint-prompt "..." --final-prompt "..."

The inpaint stage stops at --switch of its schedule and hands its latents to the refiner, which finishes the
schedule from there (diffusers' `denoising_end` / `denoising_start`). The demo has no refiner: without
--refiner the refine stage is img2img with --model from those latents, and the script says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdstudio import Chain, Engine, GenerationRequest, Settings


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="text2image and image2image model [demo]")
    p.add_argument("--inpaint-model", default="demo-inpaint", help="inpainting model [demo-inpaint]")
    p.add_argument("--refiner", default=None, help="refiner model (none: --model refines)")
    p.add_argument("--prompt", default="a large red circle in the center on a blue background")
    p.add_argument("--inpaint-prompt", default="a large yellow square in the center on a blue background")
    p.add_argument("--final-prompt", default="a large yellow square in the center on a green background")
    p.add_argument("--size", type=int, default=None, help="width and height (default: the model's own)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--switch", type=float, default=0.8, help="fraction of the inpaint schedule run before the "
                                                            "refiner takes over [0.8]")
    p.add_argument("--strength", type=float, default=0.6, help="image2image denoising strength [0.6]")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: SDSTUDIO_DEVICE or auto)")
    p.add_argument("--out", type=Path, default=Path("chain-out"), help="folder for the four images")
    return p.parse_args(argv)


def centre_mask(size: tuple[int, int]) -> Image.Image:
    """White (repaint) over the middle 60% of the picture."""
    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((w // 5, h // 5, w - w // 5 - 1, h - h // 5 - 1), fill=255)
    return mask


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse(argv)
    overrides = {"models_in_memory": 3} | ({"device": torch.device(args.device)} if args.device else {})
    chain = Chain(Engine(Settings.from_env(**overrides)))
    common = {"steps": args.steps, "seed": args.seed}

    first = chain.run(GenerationRequest(prompt=args.prompt, model=args.model, width=args.size, height=args.size,
                                        **common))
    chain.then(GenerationRequest(prompt=args.inpaint_prompt, model=args.inpaint_model,
                                 mask=centre_mask(first.images[0].image.size), strength=1.0,
                                 denoising_end=args.switch, **common))
    if args.refiner is None:
        print(f"no --refiner given: {args.model} refines instead (img2img from the inpaint stage's latents at "
              f"{args.switch})")
    chain.then(GenerationRequest(prompt=args.inpaint_prompt, model=args.refiner or args.model, **common))
    chain.then(GenerationRequest(prompt=args.final_prompt, model=args.model, strength=args.strength, **common))

    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (stage, name) in enumerate(zip(chain.stages, ("text2image", "inpaint", "refine", "image2image"),
                                          strict=True), 1):
        image = stage.result.images[0]
        path = args.out / f"{k}-{name}.png"
        image.save(path)  # with its infotext and record
        paths.append(path)
        how = "already loaded" if stage.reused else "loaded"
        stopped = stage.result.request.denoising_end
        note = f", stopped at {stopped}: its latents went on" if stopped else ""
        print(f"{k}. {name:<12} {stage.model:<16} ({how}{note}) {stage.result.seconds:5.2f} s -> {path}")
    return paths


if __name__ == "__main__":
    main()
