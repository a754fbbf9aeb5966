"""Model families: the registry picks a family from a UNet config alone, and a family added from
this file alone (no edit in the pipeline core, the sampler, export or the runners) runs end to
end against a hand-written diffusion loop over the torch UNet."""

import json

import pytest
import torch

from fd_trt.errors import InputError, UnsupportedModelError
from fd_trt.families import (
    FAMILIES,
    ModelFamily,
    PromptEmbeddings,
    StableDiffusionFamily,
    family_for_config,
    family_for_pipeline,
    register_family,
    unregister_family,
)
from fd_trt.families.base import config_value
from fd_trt.families.models import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, read_unet_config, tiny_sd_pipeline
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline
from fd_trt.pipelines.registry import pipeline_class_for, register_pipeline_class
from fd_trt.pipelines.sdxl import FasterDiffusionXLPipeline

from conftest import rel_l2

#: The test family's vocabulary: one embedding-table row per word; row 0 pads.
WORDS = ("<pad>", "a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right")
#: The test family's prompt length (SD's tiny tokenizer has 16: the graphs must take the family's).
LENGTH = 8
#: The UNet config entry that marks the test family's models.
MARKER = "fd_trt_test_table_words"


class TableFamily(ModelFamily):
    """An SD-shaped UNet whose prompts are rows of a fixed embedding table (the wrapped pipeline's
    ``text_encoder``, an ``nn.Embedding``), one row per word, padded to :data:`LENGTH`."""

    name = "test-table"
    description = "a test family: an SD-shaped UNet conditioned on rows of a word embedding table"

    def matches_config(self, unet_config):
        return config_value(unet_config, MARKER) is not None

    def check_config(self, unet_config):
        super().check_config(unet_config)
        if self.unet_kind(unet_config) != "text2img":
            raise UnsupportedModelError("the test-table family runs text-to-image UNets only")

    def load_pipeline(self, folder, unet_config):
        # A stand-in for loading weights: the pipeline the test put there.
        return LOADED[str(folder)]

    def text_shape(self, sd_pipeline):
        return LENGTH, int(sd_pipeline.text_encoder.embedding_dim)

    def tokens(self, text):
        words = text.split()
        unknown = [w for w in words if w not in WORDS]
        if unknown or len(words) > LENGTH:
            raise InputError(f"the test-table family knows {len(WORDS)} words and {LENGTH} tokens, got {text!r}")
        return [WORDS.index(w) for w in words] + [0] * (LENGTH - len(words))

    def encode_prompt(
        self,
        sd_pipeline,
        prompts,
        negative_prompt,
        num_images_per_prompt,
        do_classifier_free_guidance,
        *,
        height,
        width,
        device,
        **options,
    ):
        self.check_prompt_options(prompts, **options)
        table = sd_pipeline.text_encoder

        def embed(texts):
            ids = torch.tensor([self.tokens(t) for t in texts], device=table.weight.device)
            return table(ids).repeat_interleave(num_images_per_prompt, dim=0).to(device)

        pos = embed(prompts)
        if not do_classifier_free_guidance:
            return PromptEmbeddings(text=pos)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        return PromptEmbeddings(text=torch.cat([embed(negatives), pos]))


class WordTable(torch.nn.Embedding):
    """The test family's text encoder: one row per word, with the ``dtype`` and ``device`` that
    diffusers' ``pipeline.to`` reads of its components."""

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def device(self):
        return self.weight.device


#: Folder -> the pipeline TableFamily.load_pipeline returns for it.
LOADED: dict = {}


@pytest.fixture
def table_family():
    """The test family, registered for one test and unregistered after it, whatever happens."""
    family = register_family(TableFamily())
    try:
        yield family
    finally:
        unregister_family(family.name)


@pytest.fixture(scope="module")
def table_sd():
    """A diffusers StableDiffusionPipeline of the test family: a tiny SD UNet marked in its
    config, a seeded embedding table as its text encoder, no tokenizer."""
    from diffusers import StableDiffusionPipeline

    base = tiny_sd_pipeline(seed=5)
    base.unet.register_to_config(**{MARKER: len(WORDS)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        table = WordTable(len(WORDS), int(base.unet.config.cross_attention_dim)).eval()
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=table,
        tokenizer=None,
        unet=base.unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_latents(sd, prompt, negative_prompt, latents, steps, guidance_scale):
    """A plain DDIM loop with classifier-free guidance over the torch UNet, conditioned on the
    table rows of the prompt's words, written out here with nothing of fd_trt."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(steps)

    def rows(text):
        ids = [WORDS.index(w) for w in text.split()]
        return sd.text_encoder.weight[torch.tensor(ids + [0] * (LENGTH - len(ids)))]

    text = torch.stack([rows(negative_prompt), rows(prompt)])
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = sd.unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=text).sample
            uncond, cond = eps.chunk(2)
            x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return x


PROMPT, NEGATIVE = "a red circle on the left", "blue square"


# the registry, from configs alone ---------------------------------------------------------------
def test_sd_and_sdxl_are_registered_and_served_by_their_classes():
    assert list(FAMILIES)[:2] == ["sd", "sdxl"]
    assert pipeline_class_for("sd") is FasterDiffusionPipeline
    assert pipeline_class_for("sdxl") is FasterDiffusionXLPipeline


@pytest.mark.parametrize(
    "config, family, kind",
    [
        ({"_class_name": "UNet2DConditionModel", **SD15_UNET_CONFIG}, "sd", "text2img"),
        ({**SD15_UNET_CONFIG, "in_channels": 9, "out_channels": 4}, "sd", "inpaint"),  # SD inpainting
        ({**SD15_UNET_CONFIG, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20]}, "sd", "text2img"),
        ({"_class_name": "UNet2DConditionModel", **SDXL_UNET_CONFIG}, "sdxl", "text2img"),
        # the refiner: 5 time ids, the second encoder's 1280 hidden states
        (
            {**SDXL_UNET_CONFIG, "cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560},
            "sdxl",
            "text2img",
        ),
    ],
    ids=["sd15", "sd15-inpaint", "sd2", "sdxl-base", "sdxl-refiner"],
)
def test_the_registry_picks_the_family_from_a_config_alone(tmp_path, config, family, kind):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))  # no weights anywhere
    found = family_for_config(read_unet_config(tmp_path))
    assert found.name == family
    found.check_config(config)  # supported: no refusal
    assert found.unet_kind(config) == kind


def test_what_a_family_refuses_it_refuses_from_the_config():
    sdxl = family_for_config(SDXL_UNET_CONFIG)
    with pytest.raises(UnsupportedModelError, match="SDXL text-to-image only"):
        sdxl.check_config({**SDXL_UNET_CONFIG, "in_channels": 9})
    sd = family_for_config({**SD15_UNET_CONFIG, "class_embed_type": "timestep"})
    assert sd.name == "sd"
    with pytest.raises(UnsupportedModelError, match="class_embed_type='timestep'"):
        sd.check_config({**SD15_UNET_CONFIG, "class_embed_type": "timestep"})


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"_class_name": "UNet2DConditionModel", "addition_embed_type": "image"}, "addition_embed_type='image'"),
        ({"_class_name": "Transformer2DModel", "in_channels": 4}, "_class_name='Transformer2DModel'"),
    ],
)
def test_an_unknown_config_is_refused_naming_every_family(config, fragment):
    with pytest.raises(UnsupportedModelError, match="no registered model family") as err:
        family_for_config(config)
    assert fragment in str(err.value)
    for family in FAMILIES.values():
        assert f"{family.name} ({family.description})" in str(err.value)
    assert "register_family" in str(err.value)


def test_registering_a_taken_name_is_an_input_error():
    with pytest.raises(InputError, match="'sd' is registered already"):
        register_family(StableDiffusionFamily())
    with pytest.raises(InputError, match="ModelFamily instance"):
        register_family(object())
    with pytest.raises(InputError, match="served by FasterDiffusionXLPipeline already"):
        register_pipeline_class("sdxl", FasterDiffusionPipeline)
    with pytest.raises(InputError, match="no model family named 'nope'"):
        unregister_family("nope")
    assert list(FAMILIES)[:2] == ["sd", "sdxl"]


# a family added from this file -------------------------------------------------------------------
def test_a_registered_family_is_recognised_before_the_older_ones(table_family, table_sd):
    marked = {**SD15_UNET_CONFIG, MARKER: len(WORDS)}
    assert family_for_config(marked) is table_family  # newest first: SD would take it too
    assert family_for_config(SD15_UNET_CONFIG).name == "sd"
    assert family_for_pipeline(table_sd) is table_family


def test_the_new_family_runs_on_the_base_pipeline_as_a_hand_written_loop(table_family, table_sd):
    pipe = FasterDiffusionPipeline.from_diffusers(table_sd, backend="torch", device="cpu", progress=False)
    assert type(pipe) is FasterDiffusionPipeline and pipe.family is table_family
    assert pipe.text_shape() == (LENGTH, 32) and pipe.added_shapes() is None
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=50, guidance_scale=6.0, latents=latents)
    ref = reference_latents(table_sd, PROMPT, NEGATIVE, latents, 50, 6.0)

    out = pipe(PROMPT, schedule="all", output_type="latent", **common)
    assert rel_l2(out.images, ref) < 1e-5
    assert out.stats.encoder_calls == 50 and out.stats.encoder_rows == 100

    # The VAE decode is the base pipeline's, the same for every family.
    image = pipe(PROMPT, schedule="all", output_type="np", **common).images
    with torch.no_grad():
        decoded = table_sd.vae.decode(ref / table_sd.vae.config.scaling_factor).sample
    ref_image = table_sd.image_processor.postprocess(decoded, output_type="np")
    assert rel_l2(torch.from_numpy(image), torch.from_numpy(ref_image)) < 1e-5

    # Faster Diffusion: the encoder at the paper's key steps only, close to the full run but not it.
    paper = pipe(PROMPT, schedule="paper", output_type="latent", **common)
    assert paper.stats.key_steps == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert paper.stats.encoder_calls == 9 and paper.stats.decoder_rows == 100
    assert 1e-3 < rel_l2(paper.images, ref) < 0.2


def test_the_new_family_runs_on_onnxruntime(table_family, table_sd, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("FD_TRT_CACHE", str(tmp_path / "cache"))
    pipe = FasterDiffusionPipeline.from_diffusers(table_sd, backend="onnxruntime", device="cpu", progress=False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=20,
        guidance_scale=6.0,
        latents=latents,
        schedule="all",
        output_type="latent",
    )
    assert out.stats.backend == "onnxruntime"
    assert rel_l2(out.images, reference_latents(table_sd, PROMPT, NEGATIVE, latents, 20, 6.0)) < 1e-4
    manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    assert list(manifest["text_shape"]) == [LENGTH, 32]  # the family's text shape, not SD's tokenizer's


def test_the_new_family_loads_from_a_folder_and_refuses_what_it_does_not_run(table_family, table_sd, tmp_path):
    folder = tmp_path / "table-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({**dict(table_sd.unet.config)}))
    LOADED[str(folder)] = table_sd
    try:
        pipe = FasterDiffusionPipeline.from_pretrained(folder, backend="torch", device="cpu", progress=False)
    finally:
        del LOADED[str(folder)]
    assert type(pipe) is FasterDiffusionPipeline and pipe.family is table_family and pipe.sd is table_sd
    assert pipe.model_dir == folder
    with pytest.raises(InputError, match="takes no prompt options, got prompt_2"):
        pipe.check_inputs(PROMPT, None, 64, 64, 2, 5.0, 1, "latent", prompt_2="a")
    with pytest.raises(InputError, match="knows 11 words"):
        pipe("a purple circle", num_inference_steps=2, output_type="latent")
    with pytest.raises(InputError, match="FasterDiffusionXLPipeline wraps an SDXL pipeline"):
        FasterDiffusionXLPipeline(table_sd, backend="torch", progress=False)

    from test_controlnet import tiny_controlnet

    with pytest.raises(
        UnsupportedModelError, match="does not run a ControlNet yet with a 'test-table' model.*\\(sd\\)"
    ):
        FasterDiffusionPipeline.from_diffusers(
            table_sd, backend="torch", progress=False, controlnet=tiny_controlnet(table_sd.unet, 0)
        )


def test_the_new_family_is_gone_after_its_tests(table_sd):
    assert "test-table" not in FAMILIES
    assert family_for_config({**SD15_UNET_CONFIG, MARKER: len(WORDS)}).name == "sd"
    assert family_for_pipeline(table_sd).name == "sd"
