"""distlab export, --init-from and distlab generate: a run as a Hugging Face GPT-2 and back.

One fsdp x2 run of the tiny model (3 steps, final checkpoint, final weights) is trained once
per module and exported once; the slow tests read it. The error tests need no training.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import TINY_LOCAL_RUN, assert_one_line_error, run_main
from tests.test_checkpoint_safety import assert_live, plant, system_payload
from tests.test_generation import argmax_without_cache, one_thread  # noqa: F401 - autouse

from distlab.data import global_batch, load_tokens, prepare_tokens
from distlab.errors import DistlabError
from distlab.hf.directory import load_directory, write_directory
from distlab.hf.run_weights import load_run_model
from distlab.hf.tokenizer import byte_tokenizer
from distlab.model import PRESETS, GPTConfig, build_model
from distlab.run.files import FINAL_WEIGHTS_FILE, METRICS_FILE, read_jsonl

QUIET_RUN = [*TINY_LOCAL_RUN, "--track-memory", "off", "--track-time", "off"]
"""A run read for its losses and checkpoint only."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step fsdp x2 run: sharded DCP checkpoint, and its full final weights to compare."""
    run_dir = tmp_path_factory.mktemp("hf") / "fsdp"
    result = run_main(
        "distlab.launch", *QUIET_RUN, "--strategy", "fsdp", "--nproc", "2", "--steps", "3",
        "--save-final-weights", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def exported(trained: Path) -> Path:
    out = trained.parent / "exported"
    result = run_main("distlab.export", str(trained), str(out))
    assert result.returncode == 0, result.stderr
    assert "config.json, model.safetensors, tokenizer.json, tokenizer_config.json" in result.stdout
    return out


def batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) of a tiny run's global batch ``step`` (seed 0, 32 tokens)."""
    tokens = load_tokens(prepare_tokens(None))
    return global_batch(tokens, 0, step, rows, PRESETS["tiny"].block_size)


@pytest.mark.slow
def test_export_holds_the_run_and_transformers_gives_the_same_logits(
    trained: Path, exported: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    model, checkpoint = load_run_model(trained)
    assert checkpoint.name == "step_000003"
    # The two fsdp shards, resharded into one process, are the run's final weights.
    final = torch.load(trained / FINAL_WEIGHTS_FILE, weights_only=True)
    state = model.state_dict()
    assert set(state) == set(final)
    assert all(torch.equal(state[name], final[name]) for name in final)

    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf) is GPT2LMHeadModel
    inputs, _ = batch(0)
    with torch.no_grad():
        ours, theirs = model(inputs), hf(input_ids=inputs).logits
    # Bitwise: the same ops on the same weights (GPT-2's fused c_attn and transposed
    # Conv1D weights happen to reduce in the same order on this CPU; docs/hugging_face.md).
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()

    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "def f(x):\n    return 'é' * x  # 中\n"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_init_from_the_export_starts_from_its_weights(tmp_path: Path, exported: Path) -> None:
    result = run_main(
        "distlab.launch", *QUIET_RUN, "--strategy", "ddp", "--nproc", "2", "--steps", "1",
        "--no-final-checkpoint", "--init-from", str(exported), "--run-dir", str(tmp_path / "run"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first_loss = read_jsonl(tmp_path / "run" / METRICS_FILE)[0]["loss"]

    def loss_on_batch_0(model: torch.nn.Module) -> float:
        inputs, targets = batch(0)
        with torch.no_grad():
            logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()

    source = build_model("tiny", seed=0)
    load_directory(source, exported)
    # ddp's loss is the mean of its two ranks' half-batch means: the same sum, rounded twice.
    assert first_loss == pytest.approx(loss_on_batch_0(source), rel=1e-6)
    assert abs(first_loss - loss_on_batch_0(build_model("tiny", seed=0))) > 1e-2  # not the seed's


@pytest.mark.slow
def test_generate_is_seeded_and_greedy_is_argmax(trained: Path) -> None:
    def generate(*flags: str) -> str:
        result = run_main("distlab.generate", str(trained), "--prompt", "def ", *flags)
        assert result.returncode == 0, result.stderr
        return result.stdout.removesuffix("\n")

    sampled = generate("--tokens", "20", "--seed", "7", "--top-k", "20")
    assert sampled.startswith("def ") and len(sampled.encode()) > len("def ")
    assert sampled == generate("--tokens", "20", "--seed", "7", "--top-k", "20")
    model, _ = load_run_model(trained)
    expected = argmax_without_cache(model, list(b"def "), 40)  # past the 32-token context
    greedy = generate("--tokens", "40", "--temperature", "0")
    assert greedy == bytes(list(b"def ") + expected).decode("utf-8", errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "library"), [("zero3", "deepspeed"), ("fairscale-sdp", "fairscale")]
)
def test_strategy_formats_give_the_run_final_weights(tmp_path: Path, strategy: str, library: str):
    pytest.importorskip(library)
    run_dir = tmp_path / strategy
    result = run_main(
        "distlab.launch", *QUIET_RUN, "--strategy", strategy, "--nproc", "2", "--steps", "1",
        "--save-final-weights", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, _ = load_run_model(run_dir)  # DeepSpeed consolidates ZeRO-3 partitions; fairscale: whole
    final = torch.load(run_dir / FINAL_WEIGHTS_FILE, weights_only=True)
    assert all(torch.equal(tensor, final[name]) for name, tensor in model.state_dict().items())


@pytest.mark.slow
def test_a_hostile_checkpoint_is_refused_before_it_runs(tmp_path: Path, trained: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (checkpoint,) = (copy / "checkpoints").glob("step_*")
    target = tmp_path / "owned"
    assert_live(checkpoint / ".metadata", system_payload, tmp_path)  # it would run if unpickled
    plant(checkpoint / ".metadata", system_payload(target))
    for command in (["distlab.export", str(copy), str(tmp_path / "out")],
                    ["distlab.generate", str(copy), "--prompt", "a", "--tokens", "1"]):  # fmt: skip
        result = run_main(*command)
        assert_one_line_error(result, "refused: .metadata")
        assert not target.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_truncated_checkpoint_is_a_one_line_error(tmp_path: Path, trained: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    shard = sorted((copy / "checkpoints").glob("step_*/*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    result = run_main("distlab.export", str(copy), str(tmp_path / "out"))
    assert_one_line_error(result, f"is corrupt ({shard.name} is 100 of ")


def test_a_missing_run_or_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert_one_line_error(run_main("distlab.export", str(missing), str(tmp_path / "o")), "no such")
    no_checkpoint = tmp_path / "run"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.yaml").write_text("model: tiny\n")
    for command in (["distlab.export", str(no_checkpoint), str(tmp_path / "o")],
                    ["distlab.generate", str(no_checkpoint), "--prompt", "a"]):  # fmt: skip
        assert_one_line_error(run_main(*command), "has no committed checkpoint")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert_one_line_error(
        run_main("distlab.export", str(no_checkpoint), str(taken)), "not an empty directory"
    )


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--tokens", "0"], "--tokens must be >= 1 (got 0)"),
        (["--temperature", "-0.5"], "--temperature must be >= 0 (got -0.5)"),
        (["--top-k", "0"], "--top-k must be >= 1"),
    ],
)
def test_generate_refuses_impossible_settings(flags: list[str], fragment: str) -> None:
    result = run_main("distlab.generate", "no-run", "--prompt", "a", *flags)
    assert_one_line_error(result, fragment)


def test_init_from_refuses_what_it_cannot_start_from(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    write_directory(tiny, PRESETS["tiny"], build_model("tiny", seed=0).state_dict())

    def launch(*flags: str):
        run_dir = tmp_path / "never"
        result = run_main(
            "distlab.launch", *QUIET_RUN, "--steps", "1", "--run-dir", str(run_dir), *flags
        )
        assert not run_dir.exists()  # refused before anything was made
        return result

    assert_one_line_error(launch("--init-from", str(tmp_path / "none")), "no such model directory")
    assert_one_line_error(
        launch("--init-from", str(tiny), "--model", "small"),
        "holds 4 layers x 48, 4 heads, vocab 256, context 32, but --model is small "
        "(8 layers x 128, 4 heads, vocab 256, context 128)",
    )
    assert_one_line_error(
        launch("--init-from", str(tiny), "--resume", str(tmp_path)), "give one of them"
    )
    (tiny / "model.safetensors").unlink()
    assert_one_line_error(launch("--init-from", str(tiny)), "holds no model.safetensors")


def test_gpt2_directories_computing_another_function_are_refused(tmp_path: Path) -> None:
    directory = tmp_path / "gelu_new"
    write_directory(directory, PRESETS["tiny"], build_model("tiny", seed=0).state_dict())
    settings_file = directory / "config.json"
    settings_file.write_text(
        json.dumps({**json.loads(settings_file.read_text()), "activation_function": "gelu_new"})
    )
    with pytest.raises(DistlabError, match="activation_function is 'gelu_new'"):
        load_directory(build_model("tiny", seed=0), directory)
    with pytest.raises(DistlabError, match="mixture of experts"):
        write_directory(tmp_path / "moe", PRESETS["tiny-moe"], {})


def test_without_the_libraries_export_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    from distlab.hf import directory

    monkeypatch.setattr(directory, "find_spec", lambda name: None if name == "tokenizers" else 1)
    with pytest.raises(
        DistlabError, match=r"tokenizers not installed: pip install 'distlab\[bench\]'"
    ):
        write_directory(tmp_path / "out", PRESETS["tiny"], build_model("tiny", seed=0).state_dict())
    assert not (tmp_path / "out").exists()


@settings(max_examples=12, deadline=None)
@given(
    layers=st.integers(1, 3),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 6),
    context=st.integers(1, 16),
    vocab=st.integers(256, 300),
    seed=st.integers(0, 2**16),
)
def test_export_then_init_from_is_the_identity(layers, heads, head_dim, context, vocab, seed):
    shape = GPTConfig(layers, heads, heads * head_dim, context, vocab)
    state = build_model(shape, seed).state_dict()
    loaded = build_model(shape, seed + 1)
    with tempfile.TemporaryDirectory() as directory:
        write_directory(Path(directory), shape, state)
        load_directory(loaded, Path(directory))
    assert all(torch.equal(tensor, state[name]) for name, tensor in loaded.state_dict().items())


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@settings(max_examples=50, deadline=None)
@given(text=st.text())
def test_the_tokenizer_is_utf8_bytes(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
