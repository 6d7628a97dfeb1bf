"""Bad input, wherever it is given: one line naming the problem and the fix, before any work, nothing written.

The command line's checks run before Hydra starts (``nst_exp.__main__.main``): they are called
here in-process, exactly as ``python -m nst_exp`` calls them, with Hydra's run replaced by a
failure (a slip the checks let through would start a run). One test runs the real process, for
its exit code and its stderr as a user sees them. The Python API, the schema's value checks,
image files and the bench's arguments follow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY, run_cli
from PIL import Image

import nst_exp
from nst_exp.__main__ import main
from nst_exp.api import compose_config
from nst_exp.config import validate
from nst_exp.errors import UserError
from nst_exp.images import PILLOW_PIXEL_LIMIT, open_image
from nst_exp.run.input_checks import check_image_sizes, check_inputs, header_size


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture()
def cli_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``python -m nst_exp run ARGS`` in ``tmp_path``, in-process: its one stderr line (exit code 2,
    nothing else printed, nothing written in the folder)."""
    import nst_exp.cli.run

    def hydra_started(argv: list[str]) -> int:
        raise AssertionError(f"the checks let {argv} through to Hydra")

    monkeypatch.setattr(nst_exp.cli.run, "main", hydra_started)
    monkeypatch.chdir(tmp_path)

    def call(*args: str) -> str:
        before = listing(tmp_path)
        code = main(["run", *args])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", out
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert listing(tmp_path) == before  # no outputs/, no run or sweep folder
        return lines[0]

    return call


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # a key or a value that is not in the schema
        (["loss.stlye_weight=3"], ["unknown config key 'loss.stlye_weight'", "fix: did you mean loss.style_weight?"]),
        (["trainer.max_stepz=5"], ["unknown config key 'trainer.max_stepz'", "fix: did you mean trainer.max_steps?"]),
        (["image.size=large"], ["bad value in 'image.size=large'", "Integer", "fix:"]),
        (["model.padding=mirror"], ["bad value in 'model.padding=mirror'", "reflect", "fix:"]),
        (["loss.style_layers=relu1_1"], ["fix: a list, e.g. loss.style_layers=[relu1_1]"]),
        (["image.size=[1,"], ["cannot read the override 'image.size=[1,'", "fix: key=value"]),
        # a path with letters beyond ASCII is quoted for Hydra's grammar (so read as typed); in a sweep, each value
        (["content.path=/photos/café ü.jpg"], ["content image not found: /photos/café ü.jpg"]),
        (["-m", "style.path=/a/星夜.png,/b/x.png"], ["fix: quote the value, e.g. style.path='/a/星夜.png','/b/x.png'"]),
        (["style=nope"], ["unknown style preset 'nope'", "starry_night", "fix:"]),
        (["hydra/launcher=nope"], ["Could not find 'hydra/launcher/nope'", "fix: one of", "joblib"]),
        (["logging.loggers=[tensorboard,mlfow]"], ["logging.loggers: unknown logger 'mlfow'", "fix: did you mean mlflow?"]),
        # a value of the right type that cannot work
        (["image.size=0"], ["image.size must be a positive number", "fix:"]),
        (["trainer.max_steps=-3"], ["trainer.max_steps must be a positive number", "fix:"]),
        (["loss.style_layers=[relu1_1,relu9_1]"], ["unknown style layer 'relu9_1'", "relu1_1 ", "pool5"]),
        # the inputs and the output folder
        (["content.path=/no/such/photo.jpg"], ["content image not found", "/no/such/photo.jpg", "fix:"]),
        (["style.path=builtin:nope"], ["not a bundled image", "builtin:starry_night", "fix:"]),
        (["image.max_input_pixels=1000"], ["content image", "above the 0.001 Mpx limit", "image.max_input_pixels=0"]),
        (["image.size=20"], ["becomes 20x13 px at image.size=20", "VGG19 needs up to relu5_1", "fix:"]),
        (["hydra.run.dir=/proc/no/such/run"], ["cannot create the output folder /proc/no/such/run", "fix: hydra.run.dir="]),
    ],
)
def test_a_bad_setting_on_the_command_line_is_one_line_before_any_work(cli_error, args, needles):
    line = cli_error(*TINY, *args)
    for needle in needles:
        assert needle in line, line


def test_a_file_that_is_not_an_image_is_one_line(cli_error, tmp_path):
    bad = tmp_path / "painting.jpg"
    bad.write_text("this is not a jpeg")
    line = cli_error(*TINY, f"style.path={bad}")
    assert "style file is not an image" in line and str(bad) in line


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("-m image.size=32,big", "bad value in 'image.size=big'"),
        ("-m loss.style_weight=1,2,oops", "bad value in 'loss.style_weight=oops'"),
        ("-m style.path=builtin:starry_night.jpg,/no/such/painting.jpg", "style image not found: /no/such/painting.jpg"),
        ("-m image.size=64,0", "image.size must be a positive number, got 0"),
        ("-m image.multiscale_sizes=[24],[8] image.multiscale_steps=[2]", "becomes 8x5 px at a stage of image.multiscale_sizes=8"),
    ],
)
def test_a_bad_value_anywhere_in_a_sweep_fails_before_any_job(cli_error, values, message):
    """Every value of every swept key is checked, not only the first job's."""
    assert message in cli_error(*values.split(), *TINY)


@pytest.mark.parametrize(
    "setting, says",
    [
        ("hydra.sweeper.direction=maximize", "result/objective is lower-is-better; fix: hydra.sweeper.direction=minimize"),
        ("hydra.sweeper.n_jobs=0", "hydra.sweeper.n_jobs=0 must be at least 1"),
        ("hydra.sweeper.pruner._target_=optuna.pruners.Nope", "cannot build optuna.pruners.Nope"),
        (
            "hydra.sweeper.storage='postgresql+psycopg2://nst:secret@127.0.0.1:1/none'",
            "cannot open the Optuna storage postgresql+psycopg2://nst:***@127.0.0.1:1/none",
        ),
    ],
)
def test_a_bad_optuna_setting_is_one_line_before_any_trial(cli_error, tmp_path, setting, says):
    pytest.importorskip("optuna")
    if "postgresql" in setting:
        pytest.importorskip("psycopg2")
    line = cli_error("hparams_search=adam_optuna", setting, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert says in line and "secret" not in line  # the password is never printed


def test_resuming_a_sweep_with_a_changed_setting_is_one_line(cli_error, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text('{"hydra": {"overrides": {"task": ["loss.style_weight=5,50"], "hydra": []}}}')
    line = cli_error(f"resume={sweep}", "trainer.max_steps=9")
    assert line.startswith(f"error: resume={sweep} runs that sweep's own overrides again, and trainer.max_steps=9")


def test_the_real_process_exits_2_with_one_line_and_creates_nothing(tmp_path):
    """What the user sees: exit code 2, one line on stderr (no traceback, no Hydra report), no outputs/."""
    proc = run_cli(["run", "loss.stlye_weight=3", *TINY], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: unknown config key 'loss.stlye_weight'; fix: did you mean loss.style_weight?"]
    assert list(tmp_path.iterdir()) == []


# --- the Python API -----------------------------------------------------------------------------


def test_the_python_api_gives_the_command_line_s_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    slips = [
        (lambda: compose_config(["image.size=large"]), "bad value in 'image.size=large'"),
        (lambda: compose_config(image={"size": "big"}), "bad value for 'image.size'"),
        (lambda: compose_config(["loss.stlye_weight=1"]), r"unknown config key 'loss.stlye_weight'; fix: did you mean loss.style_weight\?"),
        (lambda: compose_config(loss={"styl_weight": 1}), r"unknown config key 'loss.styl_weight'; fix: did you mean loss.style_weight\?"),
        (lambda: compose_config(["model.pooling=median"]), r"bad value in 'model.pooling=median'.*\[max, avg\]; fix:"),
        (
            lambda: nst_exp.stylize(overrides=["trainer.max_step=3"]),
            r"unknown config key 'trainer.max_step'; fix: did you mean trainer.max_steps\?",
        ),
        (lambda: nst_exp.stylize(image={"sise": 3}), "unknown config key 'image.sise'; fix: did you mean image.size"),
    ]
    for call, message in slips:
        with pytest.raises(UserError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no outputs/api/...


# --- values the schema's types allow but a run cannot use ---------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["image.size=8"], r"image.size=8 is too small for VGG19 \(4 poolings\); fix: image.size=32 or more"),
        (["optimizer.lr=0"], r"optimizer.lr must be a positive number, got 0.0; fix: optimizer.lr="),
        (["loss.style_weight=-1"], r"loss.style_weight must be >= 0, got -1.0; fix: loss.style_weight=0 or a positive number"),
        (["loss.content_layers=[conv9_9]"], r"unknown content layer 'conv9_9'; valid VGG19 layers are: conv1_1 .* pool5"),
        (["trainer.precision=16-mixed"], r"trainer.precision='16-mixed' is not supported; fix: auto, 32-true or bf16-mixed .*L-BFGS"),
        (["image.multiscale_sizes=[128]"], r"image.multiscale_sizes has 1 entries but image.multiscale_steps has 0; fix:"),
        (["image.multiscale_sizes=[512]", "image.multiscale_steps=[10]"], r"must ascend and stay below image.size=320; fix:"),
        (["init=image"], r"init=image needs image.init_path; fix: add image.init_path="),
        (["style.blend_weights=[1,2]"], r"style.blend_weights has 2 values for 1 style images; fix: one weight per image"),
        (
            ["image.size=128", "image.scale_from=64", "image.multiscale_sizes=[32]", "image.multiscale_steps=[5]"],
            r"image.scale_from=64 makes the coarse stages .*; fix: image.multiscale_sizes=\[\] ",
        ),
        (["image.size=128", "image.scale_from=64", "image.scale_ratio=1.0"], r"image.scale_ratio must be > 1, got 1.0; fix:"),
        (["image.size=128", "image.scale_from=8"], r"image.scale_from=8 is too small .*; fix: image.scale_from=64 or more"),
        (["optimizer.ema_decay=1.0"], r"optimizer.ema_decay must be in \[0, 1\), got 1.0; fix: optimizer.ema_decay=0.99"),
        (["optimizer.line_search=strong_wolfe", "optimizer.impl=compact"], r"needs torch's L-BFGS; fix: add optimizer.impl=torch"),
        (["image.size=128", "image.multiscale_sizes=[256]", "image.multiscale_steps=[5]"], r"fix: e.g. image.multiscale_sizes=\[64\]$"),
        (
            ["optimizer=adam", "optimizer.betas=[0.9,1.0]"],
            r"optimizer.betas must be two numbers in \[0, 1\) .*fix: optimizer.betas=\[0.9,0.999\]",
        ),
        (["optimizer.betas=[0.9]"], r"optimizer.betas must be two numbers in \[0, 1\) .*, got \[0.9\]; fix:"),
        (["seed=-5"], r"seed must be in \[0, 4294967295\] .*got -5; fix: seed=0"),
        (["seed=4294967296"], r"seed must be in \[0, 4294967295\]"),
        (["objective.penalty=-1"], r"objective.penalty must be >= 0, got -1.0; fix:"),
    ],
)
def test_a_value_no_run_can_use_names_its_key_and_the_fix(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        validate(compose_config(overrides))
    assert "\n" not in str(err.value)


def test_the_settings_next_to_a_refused_one_are_accepted():
    """The checks above refuse the value, not the key: its neighbours validate."""
    validate(compose_config(["model.memory=lean", "trainer.precision=auto"]))
    validate(compose_config(["optimizer.line_search=strong_wolfe"]))  # auto: torch's L-BFGS, which has one
    validate(compose_config(["optimizer.line_search=strong_wolfe", "optimizer.impl=torch"]))
    validate(compose_config(["image.size=128", "image.scale_from=64", "optimizer.ema_decay=0.99"]))
    validate(compose_config(["seed=4294967295", "optimizer=adam", "optimizer.betas=[0,0.99]"]))
    validate(compose_config(["seed=${hydra:job.num}", "launcher=parallel"]))  # set per job, after the checks
    validate(compose_config(["image.size=128", "image.multiscale_sizes=[64]", "image.multiscale_steps=[5]"]))  # the fix it suggests


# --- image files --------------------------------------------------------------------------------


def test_a_missing_image_names_the_file_and_the_key(tmp_path):
    with pytest.raises(UserError, match=r"content image not found: .*nope.jpg; fix: check content.path"):
        open_image(tmp_path / "nope.jpg", "content")


def test_a_text_file_is_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello")
    with pytest.raises(UserError, match=r"style file is not an image.*notes.png"):
        open_image(p, "style")


def test_a_truncated_image_is_one_line_naming_it(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(p)
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(UserError, match="cut.jpg") as err:
        open_image(p, "content")
    assert "\n" not in str(err.value) and "content" in str(err.value)


def test_image_above_the_pixel_limit_is_one_line_with_the_way_to_allow_it(tmp_path):
    """A huge panorama is legitimate: Pillow's bomb guard becomes a clear message naming image.max_input_pixels."""
    path = tmp_path / "panorama.png"
    Image.new("RGB", (3000, 1000), (10, 20, 30)).save(path)
    with pytest.raises(
        UserError,
        match=r"style image .*panorama.png is 3000x1000 \(3 Mpx\), above the 2 Mpx limit.*"
        r"image.max_input_pixels=0",
    ):
        open_image(path, "style", max_pixels=2_000_000)
    with pytest.raises(UserError, match="above the 2 Mpx limit"):
        header_size(path, "style", max_pixels=2_000_000)
    assert open_image(path, "style", max_pixels=0).size == (3000, 1000)  # 0: no limit
    assert open_image(path, "style").size == (3000, 1000)  # Pillow's default limit (~179 Mpx) allows it
    assert Image.MAX_IMAGE_PIXELS == PILLOW_PIXEL_LIMIT // 2  # Pillow's own guard is restored afterwards


def test_elongated_image_whose_short_side_collapses_is_one_line(tmp_path):
    """A 40:1 strip at image.size=320 is 320x8 px: VGG19's four poolings need 16 px. Caught for every size
    the run uses (stages, style size), with the long side that would work."""
    cfg = compose_config(["image.size=320"])
    check_image_sizes(cfg, (451, 300), [(752, 600)])  # the defaults are fine
    with pytest.raises(
        UserError,
        match=r"the content image \(4000x100\) becomes 320x8 px at image.size=320: its short "
        r"side is below the 16 px VGG19 needs up to relu5_1; fix: a long side of at least 640 px",
    ):
        check_image_sizes(cfg, (4000, 100), [(752, 600)])
    with pytest.raises(UserError, match=r"the style image .*style at 64 px"):
        check_image_sizes(compose_config(["image.size=320", "image.style_scale=0.2"]), (451, 300), [(752, 100)])
    with pytest.raises(UserError, match="a stage of image.multiscale_sizes=16"):
        check_image_sizes(compose_config(["image.multiscale_sizes=[16]", "image.multiscale_steps=[5]"]), (451, 300), [(752, 600)])
    shallow = compose_config(["loss.content_layers=[relu2_1]", "loss.style_layers=[relu1_1,relu2_1]"])
    check_image_sizes(shallow, (4000, 100), [(752, 600)])  # one pooling before relu2_1: 2 px suffice
    path = tmp_path / "strip.png"
    Image.new("RGB", (4000, 100)).save(path)
    with pytest.raises(UserError, match="becomes 320x8 px"):
        check_inputs(compose_config([f"content.path={path}"]))


# --- other commands -----------------------------------------------------------------------------


def test_an_unknown_vgg_layer_lists_the_valid_ones():
    """The network itself (model/ raises plain exceptions; the entry points make them one line)."""
    from nst_exp.model.vgg import build_encoder

    with pytest.raises(ValueError, match=r"unknown layer 'relu9_9'.*relu1_1 .*pool5"):
        build_encoder(["relu9_9"])


def test_an_optional_logger_that_is_not_installed_is_one_line_with_the_fix(monkeypatch):
    """Where the extra is missing (simulated: this environment has it), asking for mlflow fails before any work."""
    import importlib.util

    from nst_exp.run.loggers import check_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError, match=r"mlflow, which is not installed; fix: pip install 'nst_exp\[mlflow\]'"):
        check_available(["tensorboard", "mlflow"])
    check_available(["tensorboard", "csv"])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--steps", "0"], "--steps"),
        (["--sizes", "8"], "--sizes"),
        (["--variants", "nope"], "nope"),
        (["--repeats", "0"], "--repeats"),
        (["--tile", "8"], "--tile must be >= 16 px"),
        (["--tile-keep", "0"], "--tile-keep"),
        (["--ttq", "--ttq-size", "8"], "--ttq-size"),
        (["--content", "/no/such/photo.jpg"], "--content /no/such/photo.jpg: content image not found"),
        (["--style", "builtin:nope"], "builtin:starry_night"),
    ],
)
def test_bench_rejects_bad_arguments_naming_them(args: list[str], says: str, capsys: pytest.CaptureFixture[str]):
    from nst_exp.bench.cli import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error" in err and says in err, err


@pytest.mark.parametrize(("args", "says"), [(["--size", "8"], "--size must be >= 32"), (["--threads", "0"], "--threads")])
def test_the_quality_bench_rejects_bad_arguments_naming_them(args: list[str], says: str, capsys: pytest.CaptureFixture[str]):
    from nst_exp.bench.quality import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and says in err, err


def test_the_benches_refuse_an_output_or_image_they_could_not_use_before_any_work(tmp_path, capsys):
    """--json, --sheet and the images are checked before the first row or pair runs (they failed after the
    whole bench, its results lost, or at a pair's turn); a folder that does not exist yet is made."""
    from nst_exp.bench import cli, quality

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "sheet.png").mkdir()
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    cases = [
        (cli.parse_args, ["--json", str(tmp_path)], "is a folder"),
        (cli.parse_args, ["--json", str(blocker / "out.json")], "a_file is not a folder"),
        (cli.parse_args, ["--content", str(not_image)], "notes.png"),
        (quality.parse_args, ["--json", str(blocker / "out.json")], "a_file is not a folder"),
        (quality.parse_args, ["--sheet", str(tmp_path / "sheet.png")], "is a folder"),
        (quality.parse_args, ["--sheet", str(tmp_path / "sheet.jpg")], "a name ending in .png"),
        (quality.parse_args, ["--pairs", f"builtin:chelsea.png,{not_image}"], "notes.png"),
        (quality.parse_args, ["--pairs", "builtin:chelsea.png,/no/such.jpg"], "/no/such.jpg"),
    ]
    for parse, args, says in cases:
        with pytest.raises(SystemExit) as exc:
            parse(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and says in err and "fix" in err, (args, err)
    assert quality.parse_args(["--json", str(tmp_path / "new" / "q.json")]).json.name == "q.json"


def test_unknown_command_is_one_line_listing_the_commands(capsys):
    assert main(["stylise"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown command 'stylise'; fix: use one of run, compare, evaluate, bench (see python -m nst_exp --help)"]


def test_evaluate_of_a_missing_image_is_one_line(tmp_path, capsys):
    code = main(["evaluate", str(tmp_path / "none.png"), "--content", "builtin:chelsea.png", "--style", "builtin:starry_night.jpg"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "image not found" in err[0] and "none.png" in err[0], err


def test_compare_of_a_missing_folder_is_one_line(tmp_path, capsys):
    code = main(["compare", str(tmp_path / "nothing")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: not a folder") and "nothing" in err[0], err
