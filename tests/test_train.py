"""The training entry point: end-to-end tiny runs and one-line errors with exit code 2."""

import json
from pathlib import Path

import pytest

from episodic.train import train
from helpers import TINY, make_cfg, run_cli


@pytest.mark.parametrize("head", ["contrastive", "protonet", "r2d2"])
@pytest.mark.parametrize("shots", [(1, 1), (2, 3)])
def test_tiny_run_writes_results(tmp_path: Path, head: str, shots: tuple[int, int]) -> None:
    cfg = make_cfg(f"head={head}", f"n_supp={shots[0]}", f"n_query={shots[1]}", *TINY)
    res = train(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert 0 <= saved["linear"]["trained"] <= 100 and 0 <= saved["linear"]["random_init"] <= 100
    for key in ["5way1shot", "5way5shot"]:
        r = saved["fewshot"][key]
        assert set(r) == {"trained", "random_init"} and set(r["trained"]) == {"mean", "ci95"}
        assert 20.0 <= r["random_init"]["mean"] <= 100.0 and r["trained"]["ci95"] > 0
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    hist = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["step"] == 3 and hist[-1]["images_per_s"] > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_n_way_episodes_run(tmp_path: Path) -> None:
    cfg = make_cfg("head=r2d2", "n_way=8", *TINY)
    train(cfg, tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["head=r2d3"], "error: unknown head 'r2d3'; allowed: "),
        (["backbone=vgg"], "error: unknown backbone 'vgg'; allowed: "),
        (["data=mnist"], "error: unknown data 'mnist'; allowed: "),
        (["n_supp=0"], "error: n_supp=0 is not allowed; use an integer >= 1"),
        (["batch_size=30", "n_way=8"], "error: n_way=8 does not divide the batch of 30 images"),
        (
            ["data=cifar10", "data.params.root=/nonexistent"],
            "error: cifar-10-batches-py/ folder not found at '/nonexistent/",
        ),
        (["n_quey=1"], "error: unknown key n_quey (did you mean n_query?); allowed at the top level: "),
        (
            ["head=r2d2", "+head.params.temperature=0.1"],
            "error: unknown key head.params.temperature; allowed at head.params: bias, lam, ",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str) -> None:
    p = run_cli("episodic.train", *args, "train.steps=1", "train.progress=false")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), p.stderr
    assert "Traceback" not in p.stderr


def test_channels_last_is_the_same_step_in_nhwc(tmp_path: Path) -> None:
    """channels_last (on by default, CPU included) changes the memory format, not the math: from the same
    start, the first loss matches NCHW to float32 rounding and the first update to 2% (a wrong layout would
    be off by 100%; the rest is the CPU's channels-last BatchNorm backward, whose less accurate sums meet the
    cancellation in the first convolution's weight gradient: about 1e-3 off float64, NCHW 2e-6)."""
    import torch

    from episodic.engine import Trainer

    runs = {}
    for flag in ["true", "false"]:
        trainer = Trainer(make_cfg(*TINY, "head=r2d2", "device=cpu", f"channels_last={flag}"), tmp_path / flag)
        conv = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)][-1]  # 16 -> 16 channels
        before = conv.weight.detach().clone()
        loss = float(trainer.train_step(trainer.train_set.images[:32]).loss)
        runs[flag] = (
            loss,
            (conv.weight.detach() - before).contiguous(),
            conv.weight.is_contiguous(memory_format=torch.channels_last),
        )
    (loss_nhwc, step_nhwc, is_nhwc), (loss_nchw, step_nchw, is_nhwc_off) = runs["true"], runs["false"]
    assert is_nhwc and not is_nhwc_off
    assert loss_nhwc == pytest.approx(loss_nchw, rel=1e-5)
    assert float((step_nhwc - step_nchw).norm() / step_nchw.norm()) < 0.02
