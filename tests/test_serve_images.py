"""Image modes over HTTP (img2img, inpainting, LoRA by name) and the OpenAI-compatible images API.

Images are compared with the pipeline's own solo run of the same request (the independent
reference is the Python API, which tests/test_img2img_inpaint.py checks against diffusers).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from PIL import Image  # noqa: E402
from test_serve import Gate, wait_for  # noqa: E402

from fd_trt.errors import InputError  # noqa: E402
from fd_trt.pipelines.pipeline import FasterDiffusionPipeline  # noqa: E402
from fd_trt.serving.http import ThreadedServer, create_app  # noqa: E402
from fd_trt.serving.images import ImageLimits, decode_image, openai_mask, parse_multipart  # noqa: E402
from fd_trt.serving.runtime import GenerateRequest, Limits, ServingRuntime  # noqa: E402

KEY = "test-key-0123456789"
STEPS = 4


def load() -> FasterDiffusionPipeline:
    return FasterDiffusionPipeline.from_pretrained("default", backend="torch", device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference() -> FasterDiffusionPipeline:
    return load()


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    rt = ServingRuntime(load(), max_batch=4, max_wait_ms=20, warmup=False, limits=Limits(max_steps=20, max_size=128))
    with ThreadedServer(create_app(runtime=rt, api_keys=[KEY])) as s:
        yield s
    rt.shutdown()


def start_image(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 4 % 256, y * 4 % 256, (x + y) * 2 % 256], -1).astype(np.uint8)
    return Image.fromarray(arr)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(img: Image.Image) -> str:
    return base64.b64encode(png(img)).decode()


def white_left_mask(size: int = 64) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[:, : size // 2] = 255
    return Image.fromarray(m, "L")


def solo(pipe: FasterDiffusionPipeline, seed: int, **kw: Any) -> np.ndarray:
    out = pipe(
        kw.pop("prompt", "a red circle"),
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kw,
    )
    return np.round(out.images[0] * 255).astype(np.int16)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def post(url: str, body: dict[str, Any]) -> Any:
    return httpx.post(url + "/v1/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


# /v1/generate ---------------------------------------------------------------------------------------
def test_img2img_over_http_equals_the_solo_run(server, reference):
    img = start_image()
    r = post(server.url, {"prompt": "a red circle", "seed": 5, "steps": STEPS, "image": b64(img), "strength": 0.5})
    assert r.status_code == 200, r.text
    ref = solo(reference, 5, image=[img], strength=0.5)
    assert np.abs(pixels(r.content) - ref).max() <= 1


def test_inpainting_over_http_equals_the_solo_run(server, reference):
    img, mask = start_image(), white_left_mask()
    r = post(server.url, {"prompt": "a red circle", "seed": 6, "steps": STEPS, "image": b64(img), "mask": b64(mask)})
    assert r.status_code == 200, r.text
    ref = solo(reference, 6, image=[img], mask_image=[mask])
    got = pixels(r.content)
    assert np.abs(got - ref).max() <= 1
    # the kept half stays close to the input (the VAE round trip aside); the repainted half does not
    src = np.asarray(img, dtype=np.int16)
    assert np.abs(got[:, 40:] - src[:, 40:]).mean() < np.abs(got[:, :24] - src[:, :24]).mean()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image": "not base64!"}, "not valid base64"),
        ({"image": base64.b64encode(b"GIF89a....").decode()}, "not a PNG or JPEG"),
        ({"image": b64(start_image(256))}, "pixels"),
        ({"image": b64(start_image()), "mask": b64(white_left_mask(32))}, "mask"),
        ({"mask": b64(white_left_mask())}, "mask needs image"),
        ({"strength": 0.5}, "strength needs image"),
        ({"image": b64(start_image()), "strength": 1.5}, "strength"),
        ({"lora": "nope"}, "not registered"),
    ],
)
def test_bad_images_get_422_naming_the_field(server, fields, message):
    r = post(server.url, {"prompt": "a red circle", "steps": STEPS} | fields)
    assert r.status_code == 422, r.text
    assert message in r.text


def test_image_limits_are_checked_before_decoding():
    big = png(Image.new("RGB", (2000, 2000)))
    with pytest.raises(InputError, match="2000x2000 pixels; the limit is 4096"):
        decode_image(big, "image", ImageLimits(max_bytes=10**7, max_pixels=64 * 64))
    with pytest.raises(InputError, match="bytes"):
        decode_image(big, "image", ImageLimits(max_bytes=100, max_pixels=10**8))
    jpeg = io.BytesIO()
    start_image().save(jpeg, format="JPEG")
    assert decode_image(jpeg.getvalue(), "image", ImageLimits()).size == (64, 64)


def test_batching_groups_only_compatible_requests():
    gate = Gate(load())
    rt = ServingRuntime(gate, max_batch=8, max_wait_ms=50, warmup=False)  # type: ignore[arg-type]
    img, mask = start_image(), white_left_mask()
    kw = {"prompt": "a red circle", "steps": STEPS}
    first = rt.submit(GenerateRequest(**kw, seed=0))
    wait_for(gate.entered.is_set)
    futures = [
        rt.submit(GenerateRequest(**kw, seed=1, image=img, strength=0.5)),
        rt.submit(GenerateRequest(**kw, seed=2, image=img, strength=0.5)),
        rt.submit(GenerateRequest(**kw, seed=3, image=img, strength=0.75)),
        rt.submit(GenerateRequest(**kw, seed=4, image=img, mask_image=mask)),
        rt.submit(GenerateRequest(**kw, seed=5)),
        rt.submit(GenerateRequest(**kw, seed=6, image=img, mask_image=mask)),
    ]
    gate.event.set()
    sizes = [first.result(120).batch_size] + [f.result(120).batch_size for f in futures]
    rt.shutdown()
    # text2img alone; img2img 0.5 x2; img2img 0.75 alone; inpainting x2; text2img alone
    assert gate.calls == [1, 2, 1, 2, 1]
    assert sizes == [1, 2, 2, 1, 2, 1, 2]


def test_lora_by_name_changes_the_image_and_the_base_model_stays(tmp_path, reference):
    pytest.importorskip("peft")
    from test_weights import _lora_dir

    folder = _lora_dir(load().sd, tmp_path)
    rt = ServingRuntime(load(), max_batch=2, warmup=False, loras={"style": str(folder)})
    req = {"prompt": "a red circle", "seed": 7, "steps": STEPS}
    base = rt(GenerateRequest(**req), timeout=120)
    styled = rt(GenerateRequest(**req, lora="style"), timeout=120)
    again = rt(GenerateRequest(**req), timeout=120)
    rt.shutdown()
    ref_base = solo(reference, 7)
    assert np.abs(np.asarray(base.image, dtype=np.int16) - ref_base).max() <= 1
    assert np.array_equal(np.asarray(again.image), np.asarray(base.image))
    lora_pipe = load()
    lora_pipe.load_lora_weights(str(folder), adapter_name="style")
    ref_styled = solo(lora_pipe, 7)
    assert np.abs(np.asarray(styled.image, dtype=np.int16) - ref_styled).max() <= 1
    assert np.abs(ref_styled - ref_base).max() > 8  # the adapter really changes the picture
    with pytest.raises(InputError, match="--backend torch"):
        ServingRuntime(
            FasterDiffusionPipeline.from_pretrained("default", backend="onnxruntime", progress=False),
            warmup=False,
            loras={"style": str(folder)},
        )


# OpenAI-compatible API --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(server) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client_generates_images(client, reference):
    res = client.images.generate(
        prompt="a red circle",
        n=2,
        size="64x64",
        response_format="b64_json",
        user="someone",
        model="fd-trt",
        extra_body={"seed": 11, "steps": STEPS},
    )
    assert len(res.data) == 2 and res.created > 0
    first, second = (pixels(base64.b64decode(d.b64_json)) for d in res.data)
    assert first.shape == (64, 64, 3)
    assert np.abs(first - solo(reference, 11)).max() <= 1
    assert np.abs(second - solo(reference, 12)).max() <= 1


def test_openai_errors_have_openai_shape(client, server):
    import openai

    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="a red circle", response_format="url", extra_body={"steps": STEPS})
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="a red circle", size="huge", extra_body={"steps": STEPS})
    with pytest.raises(openai.BadRequestError, match="n"):
        client.images.generate(prompt="a red circle", n=50)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt="a red circle")
    r = httpx.post(
        server.url + "/v1/images/generations",
        json={"prompt": "x", "response_format": "url"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "invalid_request_error" and "message" in err and "param" in err
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_openai_client_edits_img2img_and_inpainting(client, reference):
    img = start_image()
    res = client.images.edit(
        image=("start.png", png(img), "image/png"),
        prompt="a red circle",
        response_format="b64_json",
        extra_body={"seed": 21, "steps": STEPS, "strength": 0.5},
    )
    got = pixels(base64.b64decode(res.data[0].b64_json))
    assert np.abs(got - solo(reference, 21, image=[img], strength=0.5)).max() <= 1
    # OpenAI's mask: transparent where the image is edited (here the left half)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, 32:, 3] = 255
    mask = Image.fromarray(rgba, "RGBA")
    res = client.images.edit(
        image=("start.png", png(img), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="a red circle",
        n=1,
        size="64x64",
        extra_body={"seed": 22, "steps": STEPS},
    )
    got = pixels(base64.b64decode(res.data[0].b64_json))
    assert np.abs(got - solo(reference, 22, image=[img], mask_image=[white_left_mask()])).max() <= 1


def test_openai_mask_and_multipart_parsing():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, 2:, 3] = 255
    m = openai_mask(Image.fromarray(rgba, "RGBA"), Image.new("RGB", (4, 4)))
    assert np.asarray(m).tolist() == [[255, 255, 0, 0]] * 4
    body = (
        b"--b\r\nContent-Disposition: form-data; name=prompt\r\n\r\nhi\r\n"
        b'--b\r\nContent-Disposition: form-data; name="image[]"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNGxx\r\n--b--\r\n"
    )
    fields = parse_multipart(body, "multipart/form-data; boundary=b")
    assert fields["prompt"] == ["hi"] and fields["image"][0].data == b"\x89PNGxx"
    with pytest.raises(InputError, match="multipart"):
        parse_multipart(body, "application/json")


def test_controlnet_by_name_over_http_equals_the_solo_run(reference):
    from fd_trt.families.models import default_controlnet_dir

    if default_controlnet_dir() is None:
        pytest.skip("no shipped default ControlNet")
    rt = ServingRuntime(load(), max_batch=2, warmup=False, controlnets={"shapes": "default"})
    mask = white_left_mask()
    with ThreadedServer(create_app(runtime=rt, api_keys=[KEY])) as s:
        body = {"prompt": "a red circle", "seed": 9, "steps": STEPS}
        r = post(
            s.url, body | {"controlnet": "shapes", "control_image": b64(mask), "controlnet_conditioning_scale": 0.8}
        )
        plain = post(s.url, body)  # the same server without the ControlNet
        bad = post(s.url, body | {"controlnet": "edges", "control_image": b64(mask)})
        missing = post(s.url, body | {"controlnet": "shapes"})
    rt.shutdown()
    assert r.status_code == 200 and plain.status_code == 200, r.text
    assert bad.status_code == 422 and "not loaded" in bad.text
    assert missing.status_code == 422 and "control_image" in missing.text
    cn = FasterDiffusionPipeline.from_pretrained(
        "default", backend="torch", device="cpu", progress=False, controlnet="default"
    )
    ref = solo(cn, 9, image=[mask.convert("RGB")], controlnet_conditioning_scale=0.8)
    assert np.abs(pixels(r.content) - ref).max() <= 1
    assert np.abs(pixels(plain.content) - solo(reference, 9)).max() <= 1
    assert np.abs(ref - solo(reference, 9)).max() > 8  # the ControlNet really steers the picture
