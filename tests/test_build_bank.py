"""`reco build-bank`: vocabulary validation, Ray == sequential, crash + rerun exactly once."""

import json

import pytest
import torch
from conftest import TINY_VIT, crash_on_call, make_image, write_corrupt_files

from reco.errors import ConfigError

# -- vocabulary files --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"cat\n\ndog\n", ":2: blank concept name"),
        (b"cat\ndog\n  Cat \n", ":3: duplicate concept 'Cat' (first on line 1)"),
        (b"cat\ncaf\xe9\n", ":2: not valid UTF-8"),
        (b"cat\n" + b"x" * 101 + b"\n", ":2: concept name longer than 100"),
        (b"# only a comment\n", "no concept names"),
    ],
)
def test_bad_vocabulary_files_name_the_line(tmp_path, content, needle):
    from index.vocab import read_vocabulary

    f = tmp_path / "names.txt"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_vocabulary(str(f))


def test_vocabulary_text_and_yaml(tmp_path):
    from index.vocab import read_vocabulary

    f = tmp_path / "names.txt"
    f.write_text("# animals\ncat\nhot  dog\n")
    assert read_vocabulary(str(f)).names == ["cat", "hot dog"]
    y = tmp_path / "v.yaml"
    y.write_text("cat:\n  synonyms: [kitten]\n  exemplars: ex/cat\ndog:\nCAT:\n")
    with pytest.raises(ConfigError, match=":5: duplicate concept 'CAT'"):
        read_vocabulary(str(y))
    y.write_text("cat:\n  synonyms: [kitten]\n  exemplars: ex/cat\ndog:\n")
    v = read_vocabulary(str(y))
    assert v.names == ["cat", "dog"] and v.concepts[0].synonyms == ("kitten",)
    assert v.concepts[0].exemplars == str((tmp_path / "ex" / "cat").resolve())
    y.write_text("cat:\n  colour: red\n")
    with pytest.raises(ConfigError, match=":1: unknown key"):
        read_vocabulary(str(y))
    y.write_text("- cat\n- ''\n")
    with pytest.raises(ConfigError, match=":2: blank"):
        read_vocabulary(str(y))


# -- the Ray job -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exemplars(tmp_path_factory):
    root = tmp_path_factory.mktemp("exemplars")
    seeds = {"cat": [1, 2, 3], "dog": [4, 5], "hot dog": [6, 7], "tree": [8, 9], "sky": [10], "bird": [11, 12]}
    for name, ss in seeds.items():
        d = root / name
        d.mkdir()
        for s in ss:
            make_image(s, (64, 64)).save(d / f"{s}.png")
    write_corrupt_files(root / "ghost")  # a concept whose archive holds only bad files
    return root


def _spec(tiny_dense_path):
    from cluster.models import EncoderSpec

    return EncoderSpec("dino_vits16", str(tiny_dense_path), dense_kwargs=TINY_VIT)


def _tasks(root, names):
    from cluster.bank_job import ConceptTask
    from index.readers import list_images

    return [ConceptTask(n, tuple(list_images(str(root / n)))) for n in names]


def _local_bank(exemplars, tiny_dense_path, cfg, names, context=()):
    from index.readers import read_images
    from reco import ConceptBank, ConceptBuilder
    from reco.encoders import create_dense_encoder

    dense = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
    imgs = {n: read_images([str(p) for p in sorted((exemplars / n).iterdir())])[0] for n in [*names, *context]}
    return ConceptBank.build(
        {n: imgs[n] for n in names},
        ConceptBuilder(dense, None, cfg),
        context_archives={c: imgs[c] for c in context} or None,
    )


@pytest.mark.slow
def test_two_actors_equal_sequential_and_failures_stay_alone(ray_local, exemplars, tiny_dense_path, tmp_path):
    """The paper's configuration (context archives, every concept independent): parallel."""
    import pyarrow.parquet as pq

    from cluster.bank_job import run_build_bank
    from cluster.config import ActorConfig
    from index.storage import load_bank
    from reco import BankConfig

    cfg = BankConfig(
        image_size=64,
        block_size=64,
        context_elimination=True,
        context_concepts=("tree", "sky"),
        context_from_vocabulary=False,
    )
    names = ["cat", "dog", "ghost", "hot dog", "sky"]
    bank, rep = run_build_bank(
        _tasks(exemplars, names),
        _spec(tiny_dense_path),
        cfg,
        str(tmp_path / "bank"),
        ActorConfig(num_actors=2, cpus_per_actor=0.5),
        _tasks(exemplars, ["tree", "sky"]),
        commit_every=2,
    )
    assert rep.built == 4 and list(rep.failed) == ["ghost"] and "no usable image" in rep.failed["ghost"]
    assert bank.names == ("cat", "dog", "hot dog", "sky")
    # the same computation in one process: references and per-concept calibration
    local = _local_bank(exemplars, tiny_dense_path, cfg, list(bank.names), ("tree", "sky"))
    assert torch.allclose(bank.references, local.references, atol=1e-5)
    assert bank.calibration is not None and torch.allclose(bank.calibration, local.calibration, atol=1e-5)
    table = pq.read_table(tmp_path / "bank" / "concepts.parquet").to_pylist()
    rows = {r["name"]: r for r in table if r["kind"] == "target"}
    assert rows["ghost"]["status"] == "failed" and rows["ghost"]["seed_index"] == []
    assert len(rows["cat"]["seed_index"]) == 3 and len(rows["cat"]["seed_scores"]) == 3
    assert rows["cat"]["context_eliminated"] == ["tree", "sky"]
    # sky is also a context concept: its seeds come from the context build, not lost
    assert rows["sky"]["reused_context_reference"] and len(rows["sky"]["seed_index"]) == 1
    assert bank.metadata["concepts"]["sky"]["seed_index"] == rows["sky"]["seed_index"]
    assert json.loads((tmp_path / "bank" / "build.json").read_text())["config_hash"] == rows["cat"]["config_hash"]
    # the assembled bank loads like any other
    again = load_bank(str(tmp_path / "bank"))
    assert again.names == bank.names


def _crash_then_rerun(monkeypatch, exemplars, tiny_dense_path, cfg, names, out: str, crash_at: int, commit_every: int):
    """Build-bank on two actors interrupted at the ``crash_at``-th commit, then rerun to the end:
    (the rows committed before the crash, the bank and report of the rerun)."""
    import cluster.bank_job as bj
    from cluster.bank_parts import committed
    from cluster.config import ActorConfig

    real = bj.commit_part
    crash_on_call(monkeypatch, bj, "commit_part", crash_at)
    with pytest.raises(KeyboardInterrupt):
        bj.run_build_bank(
            _tasks(exemplars, names),
            _spec(tiny_dense_path),
            cfg,
            out,
            ActorConfig(num_actors=2, cpus_per_actor=0.5),
            commit_every=commit_every,
        )
    rows, _, _ = committed(out)
    monkeypatch.setattr(bj, "commit_part", real)
    bank, rep = bj.run_build_bank(
        _tasks(exemplars, names),
        _spec(tiny_dense_path),
        cfg,
        out,
        ActorConfig(num_actors=2, cpus_per_actor=0.5),
        commit_every=commit_every,
    )
    return rows, bank, rep


@pytest.mark.slow
@pytest.mark.parametrize("order", ["archive-size", "confidence"])
def test_peeling_chain_equals_sequential_and_resumes(
    ray_local, exemplars, tiny_dense_path, tmp_path, monkeypatch, order
):
    """Peeling (context from the vocabulary): concepts peel off the ones built before them. Two
    actors encode ahead; the chain gives exactly the one-process bank (references, prototypes,
    calibration, order), also when it is interrupted and resumed halfway."""
    from reco import BankConfig

    cfg = BankConfig(
        image_size=64,
        block_size=64,
        context_order=order,
        seed_tokens=3,
        prototypes=2,
        context_elimination=False,
        context_from_vocabulary=True,
    )
    names = ["cat", "dog", "hot dog", "bird", "sky", "tree"]
    local = _local_bank(exemplars, tiny_dense_path, cfg, names)
    out = str(tmp_path / "bank")
    rows, bank, rep = _crash_then_rerun(monkeypatch, exemplars, tiny_dense_path, cfg, names, out, 2, commit_every=2)
    first = sorted(r["name"] for r in rows.values())
    assert first == sorted(local.metadata["build_order"][:2])  # the chain's prefix, nothing else
    assert rep.already_done == 2 and rep.built == 4 and not rep.failed
    assert bank.names == tuple(names)
    assert bank.metadata["build_order"] == local.metadata["build_order"]
    assert torch.allclose(bank.references, local.references, atol=1e-5)
    assert bank.prototypes is not None and torch.allclose(bank.prototypes, local.prototypes, atol=1e-5)
    assert torch.equal(bank.prototype_concept, local.prototype_concept)
    assert torch.allclose(bank.calibration, local.calibration, atol=1e-5)
    order_built = local.metadata["build_order"]
    for i, n in enumerate(order_built):  # each concept eliminated exactly the ones before it
        assert bank.metadata["concepts"][n]["context_eliminated"] == order_built[:i]
        assert bank.metadata["concepts"][n]["seed_index"] == local.metadata["concepts"][n]["seed_index"]


def test_default_takes_context_archives_from_the_vocabulary(ray_local, exemplars, tiny_dense_path, tmp_path):
    """The default configuration with exemplars for the vocabulary only: the paper's context
    concepts the vocabulary names (sky) are built from its own archives and eliminated from the
    others, the rest are left out and reported; the job equals the one-process build."""
    from cluster.bank_job import run_build_bank
    from cluster.config import ActorConfig
    from reco import BankConfig

    cfg = BankConfig(image_size=64, block_size=64, seed_tokens=4, keep_members=True)
    names = ["cat", "sky", "dog"]
    bank, rep = run_build_bank(
        _tasks(exemplars, names), _spec(tiny_dense_path), cfg, str(tmp_path / "bank"), ActorConfig(num_actors=1)
    )
    assert rep.built == 3 and rep.context_dropped == ["tree", "building", "road", "person"]
    assert bank.metadata["context_elimination"] == ["sky"]
    assert bank.metadata["context_dropped"] == ["tree", "building", "road", "person"]
    assert bank.metadata["concepts"]["cat"]["context_eliminated"] == ["sky"]
    local = _local_bank(exemplars, tiny_dense_path, cfg, names)
    assert local.metadata["context_dropped"] == bank.metadata["context_dropped"]
    assert torch.allclose(bank.references, local.references, atol=1e-5)
    # sky reuses its whole context reference (members too: leave-one-out still works), as in one process
    assert bank.member_sums is not None and local.member_sums is not None
    assert torch.allclose(bank.member_sums, local.member_sums, atol=1e-4)
    assert torch.equal(bank.member_counts, local.member_counts)
    job = json.loads((tmp_path / "bank" / "job_report.json").read_text())
    assert job["extra"]["context_dropped"] == rep.context_dropped


@pytest.mark.slow
def test_crash_then_rerun_builds_every_concept_exactly_once(
    ray_local, exemplars, tiny_dense_path, tmp_path, monkeypatch
):
    import cluster.bank_job as bj
    from cluster.bank_parts import committed
    from reco import BankConfig

    cfg = BankConfig(image_size=64, block_size=64, context_elimination=False)
    names = ["cat", "dog", "hot dog", "bird", "sky", "tree"]
    out = str(tmp_path / "bank")
    rows, bank, rep = _crash_then_rerun(monkeypatch, exemplars, tiny_dense_path, cfg, names, out, 3, commit_every=1)
    assert len(rows) == 2
    assert rep.already_done == 2 and rep.built == 4
    rows, refs, _ = committed(out)  # raises if any concept were committed twice
    assert sorted(r["name"] for r in rows.values()) == sorted(names)
    assert bank.names == tuple(names)
    with pytest.raises(ConfigError, match="another configuration"):
        bj.run_build_bank(
            _tasks(exemplars, names),
            _spec(tiny_dense_path),
            BankConfig(image_size=64, context_elimination=False, k=7),
            out,
        )


def _cli_build_bank(tmp_path, exemplars, tiny_dense_path, names: str):
    """(`reco build-bank` arguments into tmp_path/bank, the encoder arguments, the vocabulary file)."""
    vocab = tmp_path / "names.txt"
    vocab.write_text(names)
    cfg = tmp_path / "bank.yaml"
    cfg.write_text("bank:\n  image_size: 64\n  context_elimination: false\n")
    enc = [
        "--dense-encoder",
        "dino_vits16",
        "--dense-weights",
        str(tiny_dense_path),
        "--dense-kwargs",
        json.dumps(TINY_VIT),
    ]
    return (
        [
            "build-bank",
            "--vocab",
            str(vocab),
            "--exemplars",
            str(exemplars),
            "--out",
            str(tmp_path / "bank"),
            "--config",
            str(cfg),
            "--actors",
            "1",
            *enc,
        ],
        enc,
        vocab,
    )


@pytest.mark.slow
def test_cli_build_bank_then_pseudo_label(ray_local, exemplars, tiny_dense_path, tmp_path, caplog):
    from jobs.cli import main

    args, enc, vocab = _cli_build_bank(tmp_path, exemplars, tiny_dense_path, "cat\ndog\nunicorn\n")
    out = tmp_path / "bank"
    assert main([*args, "--report"]) == 0
    _check_browser(out / "report" / "index.html", ["cat", "dog", "unicorn"])
    import pyarrow.parquet as pq

    rows = {r["name"]: r for r in pq.read_table(out / "concepts.parquet").to_pylist()}
    assert rows["unicorn"]["status"] == "failed" and "no usable image" in rows["unicorn"]["error"]
    assert rows["cat"]["status"] == "ok"
    job = json.loads((out / "job_report.json").read_text())  # the uniform job report
    assert job["job"] == "build-bank" and job["unit"] == "concepts"
    assert job["inputs"] == {"seen": 3, "processed": 2, "already_done": 0, "skipped": 1, "failed_transient": 0}
    assert job["skipped_examples"]["archive of concept 'unicorn' holds no usable image"] == ["unicorn"]
    assert (out / "job_report.txt").read_text().startswith("build-bank: ok")
    assert job["wall_seconds"] >= job["stages"][0]["seconds"] > 0  # the job's own time, not the report's
    # context archives required (none of the vocabulary's names is a context concept): a clear
    # error, before any work
    cfg2 = tmp_path / "paper.yaml"
    cfg2.write_text("bank:\n  image_size: 64\n  context_elimination: true\n  context_required: true\n")
    caplog.clear()
    assert (
        main(
            [
                "build-bank",
                "--vocab",
                str(vocab),
                "--exemplars",
                str(exemplars),
                "--out",
                str(tmp_path / "b2"),
                "--config",
                str(cfg2),
                *enc,
            ]
        )
        == 2
    )
    assert "context concepts" in caplog.text
    # the default configuration: context concepts from exemplar folders of their names (tree, sky
    # here), the others left out and reported by the job, not refused
    cfg3 = tmp_path / "default.yaml"
    cfg3.write_text("bank:\n  image_size: 64\n  seed_tokens: 4\n")
    out3 = tmp_path / "b3"
    assert (
        main(
            ["build-bank", "--vocab", str(vocab), "--exemplars", str(exemplars), "--out", str(out3)]
            + ["--config", str(cfg3), *enc]
        )
        == 0
    )
    job3 = json.loads((out3 / "job_report.json").read_text())
    assert job3["extra"]["context_dropped"] == ["building", "road", "person"]
    assert json.loads((out3 / "build.json").read_text())["bank"]["context_concepts"] == ["tree", "sky"]
    # the bank feeds pseudo-labelling directly (encoders read from its metadata)
    src = tmp_path / "src"
    src.mkdir()
    make_image(30, (64, 48)).save(src / "x.png")
    assert (
        main(
            [
                "pseudo-label",
                str(src),
                "--bank",
                str(out),
                "--out",
                str(tmp_path / "pl"),
                "--dense-kwargs",
                json.dumps(TINY_VIT),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "pl" / "pseudo_label.json").read_text())["classes"] == ["cat", "dog"]
    job = json.loads((tmp_path / "pl" / "job_report.json").read_text())
    assert job["job"] == "pseudo-label" and job["inputs"]["processed"] == 1 and job["inputs"]["seen"] == 1


def _check_browser(page, names):
    """The archive browser parses as HTML, lists every concept, marks failures, has thumbnails."""
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.sections, self.imgs, self.inputs = [], [], [], 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag not in ("img", "input", "meta", "br"):
                self.stack.append(tag)
            if tag == "section":
                self.sections.append((a.get("data-name"), a.get("class")))
            if tag == "img":
                self.imgs.append(a["src"])
            if tag == "input":
                self.inputs += 1

        def handle_endtag(self, tag):
            assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
            self.stack.pop()

    c = Collect()
    c.feed(page.read_text())
    assert c.stack == []  # every element closed in order
    assert c.inputs == 1  # the search box
    assert {n for n, _ in c.sections} == set(names)
    assert dict(c.sections)["unicorn"] == "failed" and dict(c.sections)["cat"] == "ok"
    assert c.imgs and all((page.parent / src).is_file() for src in c.imgs)
    assert "no usable image" in page.read_text()


@pytest.mark.slow
def test_cli_build_bank_mostly_failed_exits_non_zero_and_reports_failed(
    ray_local, exemplars, tiny_dense_path, tmp_path, caplog
):
    """#16: 2 of 3 concepts failed (more than jobs.max_failed_fraction 0.5): exit 1, the report says
    failed with the fraction and the rule, one log line gives the count and the first reasons. A
    user who accepts more failures says so in the cluster config: the rerun (nothing left to
    build) is then ok."""
    from jobs.cli import main

    args, _, _ = _cli_build_bank(tmp_path, exemplars, tiny_dense_path, "cat\nunicorn\nghost\n")
    out = tmp_path / "bank"
    caplog.clear()
    assert main(args) == 1
    job = json.loads((out / "job_report.json").read_text())
    assert job["status"] == "failed" and job["max_failed_fraction"] == 0.5
    assert job["failed_fraction"] == pytest.approx(2 / 3, abs=1e-6)
    assert job["inputs"]["processed"] == 1 and job["inputs"]["skipped"] == 2
    assert (out / "job_report.txt").read_text().startswith("build-bank: failed")
    line = [r.message for r in caplog.records if "build-bank failed:" in r.message]
    assert len(line) == 1 and "2 of 3 concepts failed" in line[0] and "unicorn" in line[0], line
    lenient = tmp_path / "cluster.yaml"
    lenient.write_text("jobs:\n  max_failed_fraction: 0.9\n")
    assert main([*args, "--ray-config", str(lenient)]) == 0
    job = json.loads((out / "job_report.json").read_text())
    assert job["status"] == "ok" and job["inputs"]["already_done"] == 3 and job["max_failed_fraction"] == 0.9


def test_failed_concepts_are_logged_once_each_up_to_a_cap_then_only_counted(caplog):
    """#16: 10,000 failing names wrote 1.1 MB of warnings; the first LOGGED_FAILURES are logged, then
    one line says the rest are only counted (all of them are still in the report)."""
    import logging

    from cluster.bank_job import LOGGED_FAILURES, BankJobReport, _log_failure
    from index.report import JobReport

    report = BankJobReport(JobReport("build-bank", unit="concepts"))
    with caplog.at_level(logging.WARNING, logger="cluster.bank_job"):
        for i in range(300):
            report.report.skip(f"c{i:04d}", "empty archive")
            _log_failure(report, f"concept c{i:04d} failed: empty archive")
    lines = [r.getMessage() for r in caplog.records if r.name == "cluster.bank_job"]
    assert len(lines) == LOGGED_FAILURES + 1
    assert lines[0] == "concept c0000 failed: empty archive" and "not logged" in lines[-1]
    assert len(report.failed) == 300
