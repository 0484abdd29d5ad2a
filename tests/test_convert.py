"""HF <-> rrm-jax checkpoint conversion against transformers / safetensors as the independent reference."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.torch
import torch
import transformers
from model_utils import make_hf_model, torch_logits

from rrm_jax import checkpoint, parallel
from rrm_jax.cli import main as cli_main
from rrm_jax.errors import UserError
from rrm_jax.model import hf
from rrm_jax.model.convert import checkpoint_to_hf, hf_to_checkpoint
from rrm_jax.model.qwen2 import LOGICAL_AXES

TOKENS = np.array([[5, 17, 99, 3, 42, 8, 61], [7, 7, 1, 100, 2, 30, 12]], np.int32)


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, through the safetensors library (not our reader)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(safetensors.torch.load_file(file))
    return out


def assert_same_tensors(a: Path, b: Path):
    ta, tb = read_hf_tensors(a), read_hf_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name


def params_of(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in checkpoint.flatten(model.params()).items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact_and_transformers_loads_it(tmp_path, dtype, tied):
    src, reference = make_hf_model(tmp_path, dtype=dtype, tie_word_embeddings=tied)
    ckpt = hf_to_checkpoint(src, tmp_path / "ckpt")
    out = checkpoint_to_hf(ckpt, tmp_path / "out")
    assert_same_tensors(src, out)

    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.tie_word_embeddings == tied
    assert exported.config.rope_parameters["rope_theta"] == 5000.0
    assert torch.equal(torch_logits(exported, TOKENS), torch_logits(reference, TOKENS))


def test_streaming_in_small_blocks_is_still_exact(tmp_path, monkeypatch):
    # Blocks of 1 KiB split the embedding and lm_head into many row blocks in both directions.
    monkeypatch.setattr(hf, "BLOCK_BYTES", 1024)
    src, _ = make_hf_model(tmp_path)
    ckpt = hf_to_checkpoint(src, tmp_path / "ckpt")
    stored = checkpoint.flatten(dict(ocp.PyTreeCheckpointHandler().metadata(ckpt / "params").tree))
    assert stored["layers.gate_proj"].storage.chunk_shape == (1, 32, 56)  # one layer per chunk
    assert stored["embed"].storage.chunk_shape == (8, 32)  # 8 rows * 32 * 4 bytes = 1 KiB
    assert stored["lm_head"].storage.chunk_shape == (32, 8)
    assert_same_tensors(src, checkpoint_to_hf(ckpt, tmp_path / "out"))


def test_sharded_input_converts_like_single_file_and_export_shards(tmp_path):
    single, reference = make_hf_model(tmp_path, "single", seed=3)
    sharded, _ = make_hf_model(tmp_path, "sharded", seed=3, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    from_single = checkpoint.load_model(hf_to_checkpoint(single, tmp_path / "c1"))[0]
    from_sharded = checkpoint.load_model(hf_to_checkpoint(sharded, tmp_path / "c2"))[0]
    a, b = params_of(from_single), params_of(from_sharded)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    out = checkpoint_to_hf(tmp_path / "c2", tmp_path / "out", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) > 1
    assert all(f.stat().st_size <= 30_000 + 4096 for f in out.glob("*.safetensors"))  # + header
    assert_same_tensors(single, out)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(torch_logits(exported, TOKENS), torch_logits(reference, TOKENS))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=1, tie_word_embeddings=True),
        dict(num_key_value_heads=2),
        dict(num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6, vocab_size=131),
    ],
)
def test_loaded_model_matches_transformers(tmp_path, overrides):
    src, reference = make_hf_model(tmp_path, **overrides)
    expected = torch_logits(reference, TOKENS).numpy()
    model, config = checkpoint.load_model(src)
    assert config.num_kv_heads == overrides["num_key_value_heads"]
    np.testing.assert_allclose(np.asarray(model(TOKENS)), expected, atol=1e-4, rtol=0)
    model, _ = checkpoint.load_model(hf_to_checkpoint(src, tmp_path / "ckpt"))
    np.testing.assert_allclose(np.asarray(model(TOKENS)), expected, atol=1e-4, rtol=0)


def test_bfloat16_folder_loads_in_float32_exactly(tmp_path):
    src, reference = make_hf_model(tmp_path, dtype="bfloat16")
    model, config = checkpoint.load_model(src, dtype="float32")
    assert config.param_dtype == "float32" and model.embed[...].dtype == np.float32
    # The reference holds the same bf16-rounded weights in float32, so only float32 rounding remains.
    np.testing.assert_allclose(np.asarray(model(TOKENS)), torch_logits(reference, TOKENS).numpy(), atol=1e-4)
    assert checkpoint.load_model(src)[1].param_dtype == "bfloat16"


@pytest.mark.parametrize("source", ["hf", "ckpt"])
def test_float32_weights_with_bfloat16_compute(tmp_path, source):
    src, reference = make_hf_model(tmp_path)
    path = src if source == "hf" else hf_to_checkpoint(src, tmp_path / "ckpt")
    model, config = checkpoint.load_model(path, dtype="float32", compute_dtype="bfloat16")
    assert (config.param_dtype, config.dtype, model.config.dtype) == ("float32", "bfloat16", "bfloat16")
    assert model.embed[...].dtype == np.float32
    got, want = np.asarray(model(TOKENS)), torch_logits(reference, TOKENS).numpy()
    error = np.abs(got - want).max()
    assert 1e-4 < error < 0.05 * np.abs(want).max()  # bfloat16 activations: close, but not float32-exact


@pytest.mark.parametrize("source", ["hf", "ckpt"])
def test_mesh_load_puts_each_shard_straight_on_its_device(tmp_path, monkeypatch, source):
    src, _ = make_hf_model(tmp_path, num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    path = src if source == "hf" else hf_to_checkpoint(src, tmp_path / "ckpt")
    expected = params_of(checkpoint.load_model(path)[0])
    requested = []
    real_region = hf.HFParams.region
    monkeypatch.setattr(
        hf.HFParams, "region", lambda self, p, index: requested.append((p, index)) or real_region(self, p, index)
    )
    mesh = parallel.make_mesh(data=1, fsdp=2, tp=4)
    model, _ = checkpoint.load_model(path, mesh=mesh)
    for name, value in checkpoint.flatten(model.params()).items():
        want = parallel.logical_sharding(LOGICAL_AXES[name], mesh, value.shape)
        assert value.sharding.is_equivalent_to(want, value.ndim), name
        np.testing.assert_array_equal(np.asarray(value), expected[name])
    assert model.layers.q_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tp", None)
    if source == "hf":  # q_proj [L, D=32, N=4, H] over fsdp=2 x tp=4: each read is one device's eighth
        q_reads = [hf.region_shape(i, (2, 32, 4, 8)) for p, i in requested if p == "layers.q_proj"]
        assert q_reads and all(shape == (2, 16, 1, 8) for shape in q_reads)


def test_save_hf_and_save_checkpoint_round_trip(tmp_path):
    src, _ = make_hf_model(tmp_path, tie_word_embeddings=True, tokenizer=True)
    model, config = checkpoint.load_model(src)
    assert_same_tensors(src, checkpoint.save_hf(model, config, tmp_path / "out", assets_from=src))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    checkpoint.save_checkpoint(model, config, tmp_path / "ckpt", assets_from=src)
    again, again_config = checkpoint.load_model(tmp_path / "ckpt")
    assert again_config == config
    a, b = params_of(model), params_of(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_tokenizer_and_generation_config_travel(tmp_path):
    src, _ = make_hf_model(tmp_path, tokenizer=True)
    (src / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": 0.6, "top_p": 0.95}\n')
    ckpt = hf_to_checkpoint(src, tmp_path / "ckpt")
    out = checkpoint_to_hf(ckpt, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    text = "the judge thinks: assistant 2 is better!"
    expected = transformers.AutoTokenizer.from_pretrained(src).encode(text)
    for folder in (src, ckpt, out):
        tokenizer = checkpoint.load_tokenizer(folder)
        assert tokenizer.encode(text) == expected and tokenizer.decode(expected) == text
    bare, _ = make_hf_model(tmp_path, "bare")
    (bare / "generation_config.json").unlink()
    assert checkpoint.load_tokenizer(bare) is None
    assert checkpoint.load_tokenizer(hf_to_checkpoint(bare, tmp_path / "bare_ckpt")) is None
    assert json.loads(
        (checkpoint_to_hf(tmp_path / "bare_ckpt", tmp_path / "bare_out") / "generation_config.json").read_text()
    ) == {"bos_token_id": 1, "eos_token_id": 2}


def test_trainer_checkpoint_folder_loads_latest_step(tmp_path):
    src, _ = make_hf_model(tmp_path)
    model, config = checkpoint.load_model(src)
    root = tmp_path / "run" / "checkpoints"
    with ocp.CheckpointManager(root) as manager:
        for step in (1, 3):
            model.final_norm[...] = model.final_norm[...] + step
            manager.save(
                step,
                args=ocp.args.Composite(
                    **checkpoint.model_items(model), trainer_state=ocp.args.JsonSave({"step": step})
                ),
            )
    loaded, loaded_config = checkpoint.load_model(tmp_path / "run")  # OUTPUT_DIR with checkpoints/<step>
    assert loaded_config == config
    np.testing.assert_array_equal(np.asarray(loaded.final_norm[...]), np.asarray(model.final_norm[...]))
    out = checkpoint_to_hf(root, tmp_path / "out")
    assert torch.equal(read_hf_tensors(out)["model.norm.weight"], torch.from_numpy(np.array(model.final_norm[...])))


def test_config_json_spellings():
    base = json.loads(
        transformers.Qwen2Config(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ).to_json_string()
    )
    v4 = {k: v for k, v in base.items() if k != "rope_parameters"} | {"rope_theta": 123.0}
    v5 = base | {"rope_parameters": {"rope_type": "default", "rope_theta": 456.0}}
    assert hf.config_from_hf(v4).rope_theta == 123.0
    assert hf.config_from_hf(v5).rope_theta == 456.0
    assert hf.config_from_hf(base | {"tie_word_embeddings": True}).tie_word_embeddings is True
    assert hf.config_from_hf({k: v for k, v in base.items() if k != "tie_word_embeddings"}).tie_word_embeddings is False
    assert hf.config_from_hf(base | {"num_key_value_heads": None}).num_kv_heads == 2
    with pytest.raises(UserError, match="rope type 'yarn'"):
        hf.config_from_hf(base | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}})
    with pytest.raises(UserError, match="use_sliding_window"):
        hf.config_from_hf(base | {"use_sliding_window": True})

    ours = hf.config_from_hf(v5 | {"rms_norm_eps": 1e-5, "num_key_value_heads": 1, "eos_token_id": [2, 3]})
    back = transformers.Qwen2Config.from_dict(hf.config_to_hf(ours))
    assert (
        back.rope_parameters["rope_theta"],
        back.rms_norm_eps,
        back.num_key_value_heads,
        back.eos_token_id,
        back.head_dim,
    ) == (456.0, 1e-5, 1, [2, 3], 8)
    assert hf.config_from_hf(hf.config_to_hf(ours)) == ours


@pytest.mark.parametrize(
    "size,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000)]
)
def test_parse_size(size, expected):
    assert hf.parse_size(size) == expected


# ----------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, nothing written.


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("good"))[0]


def _rewrite_without(folder: Path, name: str):
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    del tensors[name]
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def _truncate(folder: Path):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) - 100])


def _pickle_only(folder: Path):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")


def _index_mapping_to(shard):
    """Move the weights out of the folder (to its parent) and write an index mapping every tensor to `shard`
    (a function of the moved file): the old loader followed '../x' and absolute paths anywhere."""

    def damage(folder: Path):
        moved = folder.parent / "elsewhere.safetensors"
        (folder / "model.safetensors").rename(moved)
        names = safetensors.safe_open(str(moved), "np").keys()
        index = {"metadata": {}, "weight_map": {name: shard(moved) for name in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return damage


SHARD_NAMES = "shards must be plain file names in the same folder"
BAD_HF = {
    "missing": (lambda f: shutil.rmtree(f), "does not exist"),
    "no_config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "pickle": (_pickle_only, "pytorch_model.bin, a pickle; only safetensors"),
    "model_type": (
        lambda f: _edit_config(f, model_type="llama"),
        "model_type='llama' is not supported; supported: qwen2",
    ),
    "missing_tensor": (
        lambda f: _rewrite_without(f, "model.layers.1.mlp.up_proj.weight"),
        "tensor model.layers.1.mlp.up_proj.weight is missing",
    ),
    "shape": (
        lambda f: _edit_config(f, intermediate_size=64),
        "tensor model.layers.0.mlp.gate_proj.weight in .*model.safetensors has shape \\[56, 32\\]",
    ),
    "truncated": (_truncate, "truncated safetensors file .*model.safetensors"),
    "index_parent": (
        _index_mapping_to(lambda moved: "../elsewhere.safetensors"),
        f"index.json: tensor .* is mapped to '../elsewhere.safetensors'; {SHARD_NAMES}",
    ),
    "index_absolute": (_index_mapping_to(str), f"is mapped to '/.*/elsewhere.safetensors'; {SHARD_NAMES}"),
    "index_not_a_string": (_index_mapping_to(lambda moved: 7), f"is mapped to 7; {SHARD_NAMES}"),
    "corrupt": (
        lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxxx"),
        "corrupt safetensors file .*model.safetensors",
    ),
}


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = cli_main(list(argv))
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err, pattern, out: Path):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rrm-jax: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


@pytest.mark.parametrize("case", BAD_HF)
def test_bad_hf_input(tmp_path, capsys, good_hf, case):
    folder = tmp_path / "hf"
    shutil.copytree(good_hf, folder)
    damage, pattern = BAD_HF[case]
    damage(folder)
    rc, err = run_cli(capsys, "convert", "hf-to-orbax", "--hf", str(folder), "--out", str(tmp_path / "ckpt"))
    assert_one_line_error(rc, err, pattern, tmp_path / "ckpt")


def test_pickle_file_is_refused(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"not read")
    rc, err = run_cli(
        capsys, "convert", "hf-to-orbax", "--hf", str(tmp_path / "model.pt"), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(rc, err, "model.pt is a pickle file; only safetensors", tmp_path / "o")


def test_bad_orbax_input_and_flags(tmp_path, capsys, good_hf):
    rc, err = run_cli(capsys, "convert", "orbax-to-hf", "--ckpt", str(good_hf), "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "neither a Hugging Face folder .* nor an rrm-jax checkpoint", tmp_path / "o")
    ckpt = hf_to_checkpoint(good_hf, tmp_path / "ckpt")
    rc, err = run_cli(
        capsys, "convert", "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), "--max-shard-size", "lots"
    )
    assert_one_line_error(rc, err, "size 'lots' is not valid", tmp_path / "o")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    rc, err = run_cli(capsys, "convert", "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "taken"))
    assert rc == 2 and "output" in err and "already exists" in err
    assert (tmp_path / "taken" / "file").read_text() == "keep me"


def test_failure_mid_conversion_leaves_nothing(tmp_path, monkeypatch, good_hf):
    calls = []

    def failing_region(self, path, index):
        calls.append(path)
        if len(calls) > 5:
            raise UserError("disk on fire")
        return real_region(self, path, index)

    real_region = hf.HFParams.region
    monkeypatch.setattr(hf.HFParams, "region", failing_region)
    with pytest.raises(UserError, match="disk on fire"):
        hf_to_checkpoint(good_hf, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_converts_both_ways(tmp_path, capsys, good_hf):
    rc, _ = run_cli(
        capsys, "convert", "hf-to-orbax", "--hf", str(good_hf), "--out", str(tmp_path / "ckpt"), "--dtype", "bfloat16"
    )
    assert rc == 0
    assert checkpoint.read_checkpoint_config(tmp_path / "ckpt").param_dtype == "bfloat16"
    rc, _ = run_cli(capsys, "convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    assert rc == 0
    original, exported = read_hf_tensors(good_hf), read_hf_tensors(tmp_path / "out")
    for name, value in original.items():  # float32 -> bfloat16 rounds like torch does
        assert torch.equal(exported[name], value.to(torch.bfloat16)), name


def test_relative_paths_everywhere(tmp_path, capsys, monkeypatch, good_hf):
    """Orbax refuses relative paths: every command and function that writes or reads a folder takes them."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(good_hf, "hf")
    rc, err = run_cli(capsys, "convert", "hf-to-orbax", "--hf", "hf", "--out", "ckpt/toy")
    assert rc == 0, err
    rc, err = run_cli(capsys, "convert", "orbax-to-hf", "--ckpt", "ckpt/toy", "--out", "export/toy")
    assert rc == 0, err
    assert_same_tensors(good_hf, tmp_path / "export/toy")

    model, config = checkpoint.load_model("ckpt/toy")
    assert checkpoint.save_checkpoint(model, config, "ckpt/rel") == Path("ckpt/rel")
    again, again_config = checkpoint.load_model("ckpt/rel")
    assert again_config == config and all(
        np.array_equal(a, b) for a, b in zip(params_of(model).values(), params_of(again).values())
    )
    assert checkpoint.read_checkpoint_config(Path("ckpt/rel")) == config
    checkpoint.save_hf(again, config, "export/rel")
    assert_same_tensors(good_hf, tmp_path / "export/rel")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rel", "toy"]  # no staging folder left
