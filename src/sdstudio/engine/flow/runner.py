"""The flow-matching families' runner (SD3/SD3.5, Flux.1): prepare without loading, then load and run (job.py).

What these models cannot do is a RequestError naming the field. Samplers: the flow loop is Euler on the model's
own shifted sigmas, so `Euler` (and the request default) run; another sampler is refused, or, when the request
says `sampler_fallback` (the A1111 door, as Forge does), replaced by Euler with a warning.
"""

from __future__ import annotations

import logging
import random
import time

from sdstudio.a1111.extras import addon_params
from sdstudio.engine.flow.control import FlowControlNets
from sdstudio.engine.flow.encode import T5_TOKENS, WeightedText, t5_token_count
from sdstudio.engine.flow.hires import FlowHires
from sdstudio.engine.flow.job import FlowJob
from sdstudio.engine.hooks import CancelToken, ProgressCallback
from sdstudio.engine.prepared import PreparedJob
from sdstudio.engine.requests import DEFAULT_SAMPLER, DEFAULT_SCHEDULE, GenerationRequest, GenerationResult
from sdstudio.engine.sd import canvas
from sdstudio.engine.sd.addons import AddOnLibrary
from sdstudio.engine.sd.control import LoadedControl
from sdstudio.engine.sd.hires import check_hires, check_hires_upscaler, resolve_hires
from sdstudio.engine.sd.variation import resolve_variation
from sdstudio.engine.validate import check_fields, default_size
from sdstudio.errors import RequestError
from sdstudio.models.addons.flow_lora import read_flow_lora
from sdstudio.models.addons.lora import LoraFile, loras_applied
from sdstudio.models.find.catalog import ModelFolders, ModelRef
from sdstudio.models.find.hashing import HashCache
from sdstudio.models.load.controlnet import find_controlnet
from sdstudio.models.load.flow import FAMILY_NAMES, FlowModel, FlowModels, flow_family
from sdstudio.prompts.grammar import parse
from sdstudio.prompts.grammar_attention import attention
from sdstudio.settings import Limits, Settings

log = logging.getLogger(__name__)

FLOW_SAMPLER = "Euler"
FLOW_SCHEDULES = (DEFAULT_SCHEDULE, "Simple")  # Forge's "Simple" on a flow model is its own shifted schedule


class FlowRunner:
    """Runs requests on SD3 and Flux models (one LRU of them, beside the engine's SD models)."""

    name = "flow"

    def __init__(self, settings: Settings, folders: ModelFolders, hashes: HashCache, addons: AddOnLibrary):
        self.settings, self.addons, self.folders, self.hashes = settings, addons, folders, hashes
        self.controlnets = FlowControlNets()
        self.models = FlowModels(settings.device, settings.dtype, settings.offload, hashes, folders,
                                 settings.models_in_memory)

    def owns(self, ref: ModelRef | None) -> bool:
        return ref is not None and flow_family(ref.path) is not None

    def prepare(self, request: GenerationRequest, ref: ModelRef | None) -> PreparedJob:
        assert ref is not None  # owns() said so
        family = flow_family(ref.path)
        request, notes = sampler_for(request, FAMILY_NAMES[family])
        prompt = request.prompt
        if isinstance(prompt, str):  # <lora:name:weight> tags: the files must exist; the encoders never see them
            prompt, _ = self.addons.find_loras(prompt)
        prompts = check_supported(request.replace(prompt=prompt), FAMILY_NAMES[family], self.settings.limits)
        if request.hires is not None and request.hires.prompt:
            self.check_hires_prompt(request, FAMILY_NAMES[family])
        controls = tuple(find_controlnet(unit.model, self.folders.controlnet, self.settings.names_only)
                         for unit in request.controlnets)
        return PreparedJob(request, self.name, ref, controls=controls, plain_prompts=prompts, notes=tuple(notes))

    def generate(self, job: PreparedJob, progress: ProgressCallback | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        start = time.perf_counter()
        model = self.models.get(job.model)
        req, warnings = resolve_request(job.request, model, self.settings.limits)
        positive, negative = (weighted(text, req.prompt_syntax) for text in job.plain_prompts)
        warnings = [*job.notes, *warnings, *prompt_warnings(model, (positive, negative))]
        log.info("%s %s: %d image(s), %d steps, seed %d", FAMILY_NAMES[model.family], req.mode, req.total_images,
                 req.steps, req.seed)
        loras = self.loras(job.request.prompt, model)
        with loras_applied(model.transformer, [te.encoder for te in model.clip], loras) as report:
            warnings += [f"LoRA matches only part of this model: {f.summary()}" for f in report.files
                         if not f.skipped and f.partial]
            nets = [LoadedControl(self.controlnets.get(path, model), path.name, self.hashes.model_sha256(path)[:8])
                    for path in job.controls]
            job_args = {"extra_params": addon_params(((f.name, f.short_hash) for f, w in loras if w), ()),
                        "nets": nets, "annotators": self.settings.home / "annotators"}
            if req.hires is None:
                run = FlowJob(model, req, (positive, negative), progress, cancel, **job_args)
            else:
                run = FlowHires(model, req, (positive, negative), self.hires_prompts(req), progress, cancel,
                                **job_args)
            images, latents = run.run()
        for warning in warnings:
            log.info("warning for the user: %s", warning)
        return GenerationResult(req, images, latents, time.perf_counter() - start, tuple(warnings))

    def hires_prompts(self, req: GenerationRequest) -> tuple[WeightedText, WeightedText]:
        """The second pass's prompts (the first pass's when not given); its LoRA tags were checked in prepare."""
        prompt, _ = self.addons.find_loras(req.hires.prompt or req.prompt)
        return weighted(prompt, req.prompt_syntax), weighted(req.hires.negative_prompt or req.negative_prompt,
                                                             req.prompt_syntax)

    def check_hires_prompt(self, req: GenerationRequest, family: str) -> None:
        """hr_prompt: readable by the flow encoders, naming the same LoRAs as the prompt (they apply to both)."""
        hr_text, hr_loras = self.addons.find_loras(req.hires.prompt)
        if hr_loras != self.addons.find_loras(req.prompt)[1]:
            raise RequestError("hr_prompt must name the same LoRAs, with the same weights, as the prompt: one set of "
                               "<lora:...> tags applies to both passes", "hr_prompt")
        _checked(hr_text, "hr_prompt", req.prompt_syntax, family, False)
        _checked(req.hires.negative_prompt, "hr_negative_prompt", req.prompt_syntax, family, True)

    def loras(self, prompt: str, model: FlowModel) -> list[tuple[LoraFile, float]]:
        """The LoRA files the prompt names, read for the model's family (cached by file and mtime)."""
        _, found = self.addons.find_loras(prompt)
        if found and model.offload == "sequential":
            raise RequestError("LoRAs change weights, which sequential offload streams from the CPU; use --offload "
                               "model or none with them", "prompt")
        depth = int(model.transformer.config.get("num_layers", 0))
        return [(self.addons.cached(path, lambda p: read_flow_lora(p, model.family, depth)), weight)
                for path, weight in found]


def sampler_for(req: GenerationRequest, family: str) -> tuple[GenerationRequest, list[str]]:
    """The request with the flow sampler and schedule; a sampler or schedule the loop cannot run is refused, or
    replaced with a note when the request allows the fallback."""
    notes: list[str] = []

    def refuse_or_note(field: str, refusal: str, note: str) -> None:
        if not req.sampler_fallback:
            raise RequestError(f"{field}: {refusal}", field)
        notes.append(note)

    if req.sampler not in (DEFAULT_SAMPLER, FLOW_SAMPLER):
        refuse_or_note("sampler", f"{family} models sample with the flow-matching Euler sampler; use "
                                  f"{FLOW_SAMPLER!r}, got {req.sampler!r}",
                       f"{family} models sample with Euler: sampler {req.sampler!r} was replaced by Euler")
    if req.schedule not in FLOW_SCHEDULES:
        refuse_or_note("schedule", f"{family} models step through their own shifted sigmas; use "
                                   f"{' or '.join(map(repr, FLOW_SCHEDULES))} (set `shift` to change them), got "
                                   f"{req.schedule!r}",
                       f"{family} models step through their own shifted sigmas: schedule {req.schedule!r} was "
                       f"replaced by {DEFAULT_SCHEDULE}")
        req = req.replace(schedule=DEFAULT_SCHEDULE)
    hires = req.hires
    if hires is not None and (hires.sampler not in ("", FLOW_SAMPLER, DEFAULT_SAMPLER) or
                              hires.schedule not in ("", *FLOW_SCHEDULES)):
        refuse_or_note("hr_sampler_name", f"{family} models sample with Euler on their own schedule in both passes; "
                                          f"leave hr_sampler_name and hr_scheduler empty, got {hires.sampler!r} / "
                                          f"{hires.schedule!r}",
                       f"the hires pass of {family} models samples with Euler on its own schedule: "
                       f"{hires.sampler!r} / {hires.schedule!r} were not used")
    if req.hires is not None:
        req = req.replace(hr_sampler_name="", hr_scheduler="")
    return req.replace(sampler=FLOW_SAMPLER), notes


def check_supported(req: GenerationRequest, family: str, limits: Limits) -> tuple[str, str]:
    """RequestError for every field the flow loop cannot honour; then the usual range checks. Returns the
    prompt and negative prompt (A1111 syntax kept: weights are read when encoding)."""
    not_here = f"is not available for {family} models"
    unsupported = [
        ("controlnets", any(getattr(u, "guess_mode", False) for u in req.controlnets),
         "guess mode (ControlNet is more important) is for Stable Diffusion's ControlNets"),
        ("controlnets", any(getattr(u, "preprocessor", "") == "inpaint" for u in req.controlnets),
         f"the inpaint ControlNet preprocessor is for Stable Diffusion; {family} inpaints by blending"),
        ("ip_adapters", bool(req.ip_adapters), f"IP-Adapter {not_here}: remove the units"),
        ("guidance", req.guidance != "cfg", f"guidance rules other than cfg are for Stable Diffusion UNets; {family} "
                                            "models take 'cfg'"),
        ("pag_scale", req.pag_scale != 0, f"perturbed-attention guidance {not_here}; set pag_scale to 0"),
        ("freeu", req.freeu is not False, f"FreeU is for UNets; {family} models are transformers: set freeu to "
                                          "false"),
        ("eta", req.eta is not None, "the flow Euler sampler takes no eta; leave eta unset"),
        ("guidance_rescale", req.guidance_rescale != 0, f"rescale-CFG {not_here}; set guidance_rescale to 0"),
        ("zero_terminal_snr", req.zero_terminal_snr is not False, "flow models end at sigma 0 already; set "
                                                                  "zero_terminal_snr to false"),
        ("denoising_end", req.denoising_end is not None, f"the latent handoff {not_here}"),
        ("denoising_start", req.denoising_start is not None, f"the latent handoff {not_here}"),
        ("vae", req.vae not in (None, "auto", "none"), f"{family} models decode with their own 16-channel VAE; "
                                                       "leave vae unset"),
        ("init_latents", req.init_latents is not None, f"{family} img2img takes an init image, not latents"),
        ("clip_skip", family == "Flux" and req.clip_skip != 1, "Flux reads CLIP-L's pooled output only; "
                                                               "clip_skip must be 1"),
    ]
    if req.mask is not None:
        unsupported += [
            ("masked_content", req.masked_content != "original", f"{family} inpainting starts the masked area from "
                                                                 "the image ('original')"),
            ("soft_inpainting", req.soft_inpainting is not False, f"soft inpainting {not_here}"),
            ("inpaint_method", req.inpaint_method == "condition", f"{family} models inpaint by blending; use "
                                                                  "'auto' or 'blend'"),
        ]
    for name, bad, message in unsupported:
        if bad:
            value = req.flat_fields().get(name, getattr(req, name, None))
            raise RequestError(f"{name}: {message}, got {value!r}" if name != "init_latents" else
                               f"{name}: {message}", name)
    texts = (_checked(req.prompt, "prompt", req.prompt_syntax, family, False),
             _checked(req.negative_prompt, "negative_prompt", req.prompt_syntax, family, True))
    check_fields(req.replace(sampler=DEFAULT_SAMPLER, schedule=DEFAULT_SCHEDULE, prompt_syntax="plain"), limits)
    if req.hires is not None:
        check_hires(req, limits)
        check_hires_upscaler(req.hires.upscaler)
    return texts


def _checked(text: str, name: str, syntax: str, family: str, negative: bool) -> str:
    """The text, when the flow encoders can read it: plain, or A1111's syntax with weights only."""
    if not isinstance(text, str):
        raise RequestError("prompt and negative_prompt must be text", "prompt")
    if syntax == "plain":
        return text
    if syntax != "a1111":
        raise RequestError(f"prompt_syntax: {family} models read 'a1111' (weights) or 'plain' prompts, got "
                           f"{syntax!r}", "prompt_syntax")
    parsed = parse(text, negative=negative)  # PromptSyntaxError (a RequestError) for broken syntax
    if parsed.extra_networks:  # the prompt's LoRA tags were taken out before: these are the negative prompt's
        raise RequestError(f"{name}: <{parsed.extra_networks[0].kind}:...> tags belong in the prompt, as in A1111",
                           name)
    if len(parsed.subprompts) > 1 or parsed.is_scheduled:
        raise RequestError(f"{name}: AND and prompt editing [a:b:0.5] / alternation [a|b] are not available for "
                           f"{family} models (T5 reads the prompt whole); weights (word:1.2) are", name)
    return text


def weighted(text: str, syntax: str) -> WeightedText:
    """The text T5 reads (weight syntax removed) and the chunks CLIP weights (docs/flow.md)."""
    if syntax == "plain":
        return WeightedText(text)
    # BREAK (weight -1) has no meaning without CLIP's 75-token chunks: it reads as a space
    chunks = tuple((" ", 1.0) if weight == -1 else (chunk, weight)
                   for chunk, weight in attention(parse(text).subprompts[0].text))
    return WeightedText("".join(chunk for chunk, _ in chunks), chunks)


def resolve_request(req: GenerationRequest, model: FlowModel, limits: Limits) -> tuple[GenerationRequest, list[str]]:
    """Size (multiples of the model's grid; default: its native size, or the init image's), seed, model name."""
    grid, warnings = model.grid, []
    width, height = default_size(req, grid, model.native_size, limits)
    for name, value in (("width", width), ("height", height)):
        if value % grid:
            raise RequestError(f"{name} must be a multiple of {grid} for {FAMILY_NAMES[model.family]} models (8 "
                               f"pixels per latent cell, 2x2 cells per token), got {value} (nearest: "
                               f"{max(grid, round(value / grid) * grid)})", name)
    if req.mode == "inpaint" and canvas.is_empty(req.mask, req.invert_mask):
        warnings.append("the mask is empty (nothing is white): nothing was repainted")
    if req.mode != "txt2img" and min(req.steps * req.strength, req.steps) < 1:
        warnings.append(f"strength {req.strength} over {req.steps} steps denoises nothing: the init image comes "
                        "back")
    if model.guidance_embeds and req.cfg_scale > 1:
        warnings.append(f"CFG scale {req.cfg_scale} > 1 runs true CFG on a guidance-distilled Flux model: twice the "
                        "time per step; its guidance is distilled_cfg_scale (Forge's Distilled CFG Scale), with CFG "
                        "scale 1")
    seed = req.seed if req.seed != -1 else random.randrange(2**32)
    resolved = resolve_variation(req.replace(width=width, height=height, seed=seed, model=model.name), model.factor)
    return resolve_hires(resolved, req, grid, limits), warnings


def prompt_warnings(model: FlowModel, texts: tuple[WeightedText, WeightedText]) -> list[str]:
    """T5 reads T5_TOKENS[family] tokens: say when a prompt is longer (the rest is cut)."""
    if model.t5 is None:
        return []
    window, out = T5_TOKENS[model.family], []
    for name, text in zip(("prompt", "negative prompt"), texts, strict=True):
        count = t5_token_count(model.t5, text.text)
        if count > window:
            out.append(f"the {name} is {count} T5 tokens; {FAMILY_NAMES[model.family]} reads {window}: the "
                       "rest was cut")
    return out
