"""The zoo: deterministic data, diffusers-style pipelines, the evaluator, and trained-model quality."""

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ditscope import DitscopeError, zoo
from ditscope.bench import evaluation
from ditscope.cli.main import app
from ditscope.profiling.workload import samples
from ditscope.zoo import data, evaluator
from ditscope.zoo.pipeline import ShapesPipeline
from ditscope.zoo.train import build

needs_evaluator = pytest.mark.skipif(
    not evaluator.WEIGHTS.is_file(), reason="evaluator weights not shipped yet"
)


def test_data_is_deterministic_and_captions_describe_the_image():
    a, scenes = data.dataset(16, seed=3)
    b, _ = data.dataset(16, seed=3)
    c, _ = data.dataset(16, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (16, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    for scene in scenes:
        assert data.parse_caption(scene.caption()) == scene
        assert 1 <= len(scene.objects) <= 2
    # an object's colour is at its cell's centre
    scene = data.Scene((data.Obj("square", "red", "large", 4),), "black")
    img = data.render(scene)
    np.testing.assert_allclose(img[:, 16, 16], data.COLORS["red"], atol=1e-6)
    np.testing.assert_allclose(img[:, 1, 1], data.BACKGROUNDS["black"], atol=1e-6)


def test_video_objects_move_as_the_caption_says():
    videos, scenes = data.video_dataset(12, seed=0)
    assert videos.shape == (12, 8, 3, 32, 32)
    for frames, scene in zip(videos, scenes):
        assert "moving" in scene.caption()
        assert evaluator.motion_direction(frames) == scene.direction


@pytest.fixture(scope="module")
def untrained_pixart():
    pipe = build("tiny-pixart")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_pipeline_is_diffusers_style_and_deterministic(untrained_pixart, tmp_path):
    pipe = untrained_pixart
    prompt = "a small red circle at the top left on a grey background"
    out = pipe([prompt, prompt], num_inference_steps=3, generator=gens(2), output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    again = pipe([prompt, prompt], num_inference_steps=3, generator=gens(2), output_type="pt").images
    assert torch.equal(out, again)
    assert not torch.equal(out[0], out[1])  # one generator per prompt
    pil = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.size == (32, 32)
    assert pipe(prompt, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    pipe.save_pretrained(tmp_path / "p")
    loaded = zoo.load_pipeline(str(tmp_path / "p"))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, ShapesPipeline)
    reloaded = loaded([prompt, prompt], num_inference_steps=3, generator=gens(2), output_type="pt").images
    assert torch.equal(out, reloaded)


def test_unknown_words_fall_back_to_unk_with_a_warning(untrained_pixart):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = untrained_pixart("a glittering unicorn", num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 32, 32)
    assert any("glittering, unicorn" in str(w.message) for w in caught)


def test_class_conditional_prompts():
    pipe = build("tiny-dit")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.class_labels(["red circle", 5, "blue triangle"]) == [
        data.class_label(data.Obj("circle", "red", "small", 4)),
        5,
        data.class_label(data.Obj("triangle", "blue", "small", 4)),
    ]
    with pytest.raises(DitscopeError, match="class index"):
        pipe.class_labels(["a dragon"])
    with pytest.raises(DitscopeError, match="0..17"):
        pipe.class_labels([99])
    # deterministic for a seed (DiT's label embedding drops labels at random unless in eval mode)
    a = pipe([3, 5], num_inference_steps=3, generator=gens(2), output_type="pt").images
    assert torch.equal(a, pipe([3, 5], num_inference_steps=3, generator=gens(2), output_type="pt").images)


def test_unknown_zoo_name_is_a_clear_error():
    with pytest.raises(DitscopeError, match="unknown zoo model 'tiny-nothing'"):
        zoo.load("tiny-nothing")


@needs_evaluator
def test_evaluator_reads_real_generator_images():
    """>= 95% per attribute on fresh generator images (not the training draws)."""
    net = evaluator.load_evaluator()
    images, scenes = data.dataset(300, seed=12345)
    acc = evaluator.attribute_accuracy(net, torch.from_numpy(images), scenes)
    for key in ("shape", "color", "size", "position", "background"):
        assert acc[key] >= 0.95, (key, acc)
    # the Fréchet distance of real images to real images of other draws is small, to noise large
    other, _ = data.dataset(300, seed=999)
    real_fd = evaluator.frechet_distance(net, torch.from_numpy(images), torch.from_numpy(other))
    noise_fd = evaluator.frechet_distance(net, torch.rand(300, 3, 32, 32), torch.from_numpy(other))
    assert real_fd < 0.1 * noise_fd


def test_psnr_and_ssim():
    a = torch.rand(4, 3, 32, 32)
    psnr, ssim = evaluator.psnr_ssim(a, a)
    assert psnr == float("inf") or psnr > 80
    assert ssim == pytest.approx(1.0, abs=1e-4)
    psnr_noisy, ssim_noisy = evaluator.psnr_ssim(a, (a + 0.1 * torch.randn_like(a)).clamp(0, 1))
    assert 15 < psnr_noisy < 25 and ssim_noisy < 0.99


TRAINED = ["tiny-pixart", "tiny-dit", "tiny-mmdit", "tiny-latte"]


@needs_evaluator
@pytest.mark.parametrize("name", TRAINED)
def test_trained_model_loads_offline_is_deterministic_and_beats_random_init(name):
    if not zoo.available(name):
        pytest.skip(f"{name} weights not shipped yet")
    pipe = zoo.load(name)
    pipe.set_progress_bar_config(disable=True)
    net = evaluator.load_evaluator()
    # tiny-dit needs its 50 DDIM steps: at 10 its images are further from real renders than noise is, and
    # 8 images: with 4 the Frechet distance cannot tell it from random init. The others read colour 100%
    # against 0% at random init with few samples (tiny-latte: 4 videos x 4 steps, 32 frames).
    n, steps = {"tiny-dit": (8, 50), "tiny-latte": (4, 4)}.get(name, (8, 10))
    guidance = zoo.ZOO[name].guidance_scale
    trained = evaluation.evaluate(pipe, n=n, num_inference_steps=steps, guidance_scale=guidance, net=net)
    untrained = build(name)
    untrained.set_progress_bar_config(disable=True)
    random = evaluation.evaluate(untrained, n=n, num_inference_steps=steps, guidance_scale=guidance, net=net)
    assert trained["color"] > random["color"] + 0.3, (trained, random)
    assert trained["frechet"] < 0.5 * random["frechet"], (trained, random)
    _, prompts = evaluator.evaluation_prompts(pipe, 1, seed=7)
    a = samples(pipe(prompts, num_inference_steps=4, generator=gens(1, 1), output_type="pt"))
    b = samples(zoo.load(name)(prompts, num_inference_steps=4, generator=gens(1, 1), output_type="pt"))
    assert torch.equal(a, b)


def test_cli_generate_and_zoo_list(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(app, ["zoo", "list"])
    assert listed.exit_code == 0 and "random-pixart" in listed.stdout
    out = tmp_path / "img.png"
    result = runner.invoke(
        app,
        [
            "generate",
            "random-pixart",
            "--prompt",
            "a red circle in the center on a grey background",
            "--out",
            str(out),
            "--steps",
            "2",
            "--upscale",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (128, 128)  # random-pixart decodes 64 px through its VAE
    bad = runner.invoke(app, ["generate", "tiny-nothing", "--prompt", "x", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "unknown model" in bad.stderr
    bad_ext = runner.invoke(
        app, ["generate", "random-pixart", "--prompt", "x", "--out", str(tmp_path / "x.txt")]
    )
    assert bad_ext.exit_code == 2 and "image file" in bad_ext.stderr


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-pixart", "tiny-mmdit", "tiny-latte"])
def test_every_recipe_trains_and_its_folder_loads(name, tmp_path):
    """Two optimizer steps of each recipe; the folder written is a pipeline that generates deterministically."""
    from ditscope.zoo import train

    threads = torch.get_num_threads()
    manifest = train.train(name, tmp_path / name, steps=2, batch=2, log=lambda *_: None)
    assert manifest["steps"] == 2 and manifest["name"] == name
    # training runs on every core and gives the caller its thread count back (it leaked into later tests)
    assert torch.get_num_threads() == threads
    pipe = zoo.load_pipeline(str(tmp_path / name))
    pipe.set_progress_bar_config(disable=True)
    prompt = 3 if pipe.is_class_conditional else "a small red circle moving up on a grey background"
    a = samples(pipe([prompt], num_inference_steps=2, generator=gens(1), output_type="pt"))
    b = samples(pipe([prompt], num_inference_steps=2, generator=gens(1), output_type="pt"))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert a.shape == ((1, 8, 3, 32, 32) if name == "tiny-latte" else (1, 3, 32, 32))
    # diffusers' convention: a video pipeline returns `.frames`, an image pipeline `.images`
    out = pipe([prompt], num_inference_steps=2, generator=gens(1), output_type="pil")
    assert hasattr(out, "frames") == (name == "tiny-latte") and hasattr(out, "images") == (
        name != "tiny-latte"
    )
    if name == "tiny-latte":
        assert len(out.frames) == 1 and len(out.frames[0]) == 8 and out.frames[0][0].size == (32, 32)


def test_tiny_latte_starts_as_tiny_pixart_drawing_each_frame():
    """Warm start: spatial weights from tiny-pixart, temporal blocks the identity, so a one-frame video
    is exactly tiny-pixart's image (both unmasked: Latte takes no text mask, see ShapesPipeline)."""
    from ditscope.zoo import train

    latte = train.build("tiny-latte")
    train.warm_start(latte, "tiny-pixart")
    pixart = zoo.load("tiny-pixart")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 300])
    with torch.no_grad():
        text, _ = pixart.encode_prompt(["a small red circle moving up on a grey background", ""], "cpu")
        want = pixart.transformer(
            x,
            encoder_hidden_states=text,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        got = latte.transformer(x[:, :, None], encoder_hidden_states=text, timestep=t).sample[:, :, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-mmdit"])
def test_warm_start_from_another_architecture_is_a_clear_error(name):
    from ditscope.zoo import train

    with pytest.raises(DitscopeError, match="cannot warm-start .* from tiny-pixart"):
        train.warm_start(train.build(name), "tiny-pixart")


def test_training_from_a_bad_init_is_a_clear_error_and_writes_nothing(tmp_path):
    from ditscope.zoo import train

    with pytest.raises(DitscopeError, match="cannot warm-start .* from tiny-pixart"):
        train.train("tiny-mmdit", tmp_path / "run", steps=1, batch=2, init="tiny-pixart")
    with pytest.raises(DitscopeError, match="unknown model"):
        train.train("tiny-pixart", tmp_path / "run", steps=1, batch=2, init="no/such-model-here/x")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-mmdit"])  # DDPM + in-model label dropout; rectified flow
def test_training_resumed_from_its_checkpoint_equals_an_uninterrupted_run(name, tmp_path):
    from safetensors.torch import load_file

    from ditscope.zoo import train

    train.train(name, tmp_path / "straight", steps=3, batch=2, log=lambda *_: None)
    train.train(name, tmp_path / "resumed", steps=1, batch=2, log=lambda *_: None)
    train.train(name, tmp_path / "resumed", steps=3, batch=2, log=lambda *_: None)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_learning_rate_warms_up_then_decays_linearly_to_zero(tmp_path):
    """`lr_decay` lowers the lr linearly over the last fraction of `steps`; a bad fraction is refused before
    anything is written."""
    from ditscope.zoo import train

    train.train("tiny-dit", tmp_path / "run", steps=3, batch=2, lr=1e-3, lr_decay=0.5, log=lambda *_: None)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    # last step (index 2): warm-up 3/500, decay (3 - 2) / (0.5 * 3)
    assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 3 / 500 * (1 / 1.5))
    with pytest.raises(DitscopeError, match="lr_decay must be in"):
        train.train("tiny-dit", tmp_path / "bad", steps=3, lr_decay=1.0)
    assert not (tmp_path / "bad").exists()


def test_unknown_recipe_is_a_clear_error(tmp_path):
    from ditscope.zoo import train

    with pytest.raises(DitscopeError, match="no training recipe for 'tiny-nothing'"):
        train.train("tiny-nothing", tmp_path / "x", steps=1)


@needs_evaluator
def test_evaluator_reads_videos_and_classes_of_real_renders():
    net = evaluator.load_evaluator()
    scenes = evaluator.evaluation_scenes(48, seed=5, video=True)
    videos = torch.from_numpy(np.stack([data.render_video(s) for s in scenes]))
    acc = evaluator.video_accuracy(net, videos, scenes)
    assert acc["motion"] == 1.0 and acc["shape"] >= 0.95 and acc["color"] >= 0.95 and acc["all"] >= 0.9
    # the same videos played backwards move the other way
    assert evaluator.video_accuracy(net, videos.flip(1), scenes)["motion"] == 0.0
    assert evaluator.frechet_to_real(net, videos, scenes) < 0.5
    images, scenes = data.dataset(64, seed=6, max_objects=1)
    acc = evaluator.class_accuracy(net, torch.from_numpy(images), scenes)
    assert acc["shape"] >= 0.95 and acc["color"] >= 0.95


@needs_evaluator
@pytest.mark.parametrize("kind", ["text", "class", "video"])
def test_per_sample_hits_average_to_the_scores_and_see_each_broken_sample(kind):
    """The bench pairs a cached sample with the uncached one: its per-sample hits must be the scores'
    parts (one object per prompt), and a sample drawn wrong must read wrong, alone."""
    net = evaluator.load_evaluator()
    if kind == "video":
        scenes = evaluator.evaluation_scenes(12, seed=5, video=True)
        x = torch.from_numpy(np.stack([data.render_video(s) for s in scenes]))
    else:
        images, scenes = data.dataset(12, seed=7, max_objects=1)
        x = torch.from_numpy(images)
    hits = evaluator.sample_hits(net, x, scenes, class_conditional=kind == "class")
    scores = evaluator.score(net, x, scenes, class_conditional=kind == "class")
    assert set(hits) == set(scores)
    for key, per_sample in hits.items():
        assert per_sample.shape == (12,) and per_sample.mean() == pytest.approx(scores[key]), key
    broken = x.clone()
    broken[3] = 0.5  # a grey blank: no object
    after = evaluator.sample_hits(net, broken, scenes, class_conditional=kind == "class")
    assert after["all"][3] == 0 and hits["all"][3] == 1
    assert np.array_equal(np.delete(after["all"], 3), np.delete(hits["all"], 3))


@needs_evaluator
def test_an_interrupted_evaluation_resumes_to_the_unbroken_result(untrained_pixart, tmp_path, one_thread):
    """`ditscope eval` keeps its samples after every batch: killed and rerun, it gives what one run gives."""
    net = evaluator.load_evaluator()
    settings = dict(n=4, num_inference_steps=2, guidance_scale=4.5, batch=2, net=net)
    unbroken = evaluation.evaluate(untrained_pixart, **settings)
    state, done = tmp_path / "eval.pt", []

    def stop_in_second_batch(k):
        done.append(k)
        if sum(done) > 2:  # the first batch (2 samples) is complete and saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(
            untrained_pixart,
            **settings,
            progress=stop_in_second_batch,
            state_path=state,
            state_key={"model": "x"},
        )
    assert len(torch.load(state, weights_only=True)["images"]) == 1
    seen = []
    resumed = evaluation.evaluate(
        untrained_pixart, **settings, progress=seen.append, state_path=state, state_key={"model": "x"}
    )
    assert resumed == unbroken and not state.exists()
    assert seen[0] == 2 and sum(seen) == pytest.approx(4)  # the kept samples count at once, then per step
    # a state made with other settings is never mixed in
    done.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate(
            untrained_pixart,
            **settings,
            progress=stop_in_second_batch,
            state_path=state,
            state_key={"model": "x"},
        )
    with pytest.raises(DitscopeError, match="other settings .*model: saved 'x', now 'y'"):
        evaluation.evaluate(untrained_pixart, **settings, state_path=state, state_key={"model": "y"})


def test_cli_eval_shows_progress_and_leaves_no_state_behind(tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "tiny-pixart",
            "--random-init",
            "--n",
            "2",
            "--steps",
            "2",
            "--json",
            str(out),
            "--state-dir",
            str(tmp_path / "state"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "evaluating tiny-pixart" in result.stderr and "frechet" in result.stdout
    assert set(json.loads(out.read_text())) >= {"shape", "color", "frechet", "n"}
    assert not (tmp_path / "state").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
