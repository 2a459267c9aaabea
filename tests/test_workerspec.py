import sys
import textwrap

import pytest

from redbike.workerspec import WorkerSpecError, load_worker, parse_spec

WORKER_MODULE = """
    from redbike import RoundRobin

    class Echo(RoundRobin):
        def __init__(self, init=None, *args, **kwargs):
            super().__init__(init or "")
            self.init = init
            self.args = args
            self.kwargs = kwargs

    class Outer:
        class Inner(RoundRobin):
            def __init__(self, x):
                super().__init__()
                self.x = x

    class Broken(RoundRobin):
        def __init__(self, init):
            raise ValueError("bad init " + init)

    class NotAWorker:
        def __init__(self, *args):
            raise AssertionError("called")

    class Sneaky(RoundRobin):
        def __new__(cls, *args):
            return 42

    def make_worker(*args):
        raise AssertionError("called")

    NOT_CALLABLE = 42
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A cwd holding test modules; the modules are forgotten again afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def module(workdir, name, text):
    path = workdir / f"{name}.py"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_bare_class(workdir):
    module(workdir, "wmod_bare", WORKER_MODULE)
    worker = load_worker("wmod_bare:Echo")
    assert type(worker).__name__ == "Echo" and worker.init is None


def test_init_string_with_colons(workdir):
    module(workdir, "wmod_colons", WORKER_MODULE)
    worker = load_worker("wmod_colons:Echo('A:A:B')")
    assert worker.init == "A:A:B"
    worker = load_worker('wmod_colons:Echo("A:B")')
    assert worker.init == "A:B"


def test_args_and_kwargs(workdir):
    module(workdir, "wmod_kw", WORKER_MODULE)
    worker = load_worker(
        "wmod_kw:Echo('A:B', 3, -1.5, (1, 2), name=\"x\", flags={'a': [None, True]})"
    )
    assert worker.init == "A:B"
    assert worker.args == (3, -1.5, (1, 2))
    assert worker.kwargs == {"name": "x", "flags": {"a": [None, True]}}


def test_dotted_attribute_path(workdir):
    module(workdir, "wmod_dotted", WORKER_MODULE)
    assert load_worker("wmod_dotted:Outer.Inner(7)").x == 7


def test_package_module(workdir):
    pkg = workdir / "wpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    module(pkg, "sub", WORKER_MODULE)
    assert load_worker("wpkg.sub:Echo('i')").init == "i"


def test_cwd_module_found_without_syspath(tmp_path, monkeypatch):
    # `redbike work mymodule:Work(...)` must find mymodule.py in the cwd even
    # when the cwd is not on sys.path (installed console script).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "wmod_cwd.py").write_text(textwrap.dedent(WORKER_MODULE))
    try:
        assert load_worker("wmod_cwd:Echo('z')").init == "z"
        assert sys.path[0] == str(tmp_path)
    finally:
        sys.modules.pop("wmod_cwd", None)


@pytest.mark.parametrize(
    "args",
    [
        "__import__('os').system('touch {marker}')",
        "open('{marker}', 'w')",
        "*['{marker}']",
        "**{{'x': '{marker}'}}",
        "x='{marker}'.join([])",
        "(lambda: open('{marker}', 'w'))()",
        "[open('{marker}', 'w')]",
        "os.sep",
        'f\'{{open("{marker}", "w")}}\'',
    ],
)
def test_non_literal_args_rejected_and_nothing_runs(workdir, args):
    marker = workdir / "side_effect"
    imported = workdir / "imported"
    module(
        workdir,
        "wmod_evil",
        f"open({str(imported)!r}, 'w').close()\n" + textwrap.dedent(WORKER_MODULE),
    )
    spec = "wmod_evil:Echo(" + args.format(marker=marker) + ")"
    with pytest.raises(WorkerSpecError, match="invalid worker spec") as info:
        load_worker(spec)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # Rejected before the module is even imported.
    assert not imported.exists()


@pytest.mark.parametrize(
    "spec",
    [
        "wmod:Echo()()",  # call of a call
        "wmod:Echo[0]",
        "wmod:Echo + 1",
        "wmod:",
        "wmod",
        ":Echo",
        "wm-od:Echo",
        "wmod:Echo(",
        "wmod:'Echo'",
        "wmod:f(x)",
    ],
)
def test_malformed_specs(spec):
    with pytest.raises(WorkerSpecError) as info:
        load_worker(spec)
    assert str(info.value).startswith("invalid worker spec")
    assert "\n" not in str(info.value)


def test_parse_spec_does_not_split_on_later_colons():
    assert parse_spec("a.b:Cls('x:y', k={'1': 2})") == ("a.b", ["Cls"], ["x:y"], {"k": {"1": 2}})


def test_missing_module(workdir):
    with pytest.raises(WorkerSpecError) as info:
        load_worker("nosuchpkg_xyz.sub:Echo")
    assert str(info.value) == (
        "cannot import worker module 'nosuchpkg_xyz.sub': No module named 'nosuchpkg_xyz'"
    )


def test_missing_class(workdir):
    module(workdir, "wmod_nocls", WORKER_MODULE)
    with pytest.raises(WorkerSpecError) as info:
        load_worker("wmod_nocls:Nope('x')")
    assert str(info.value) == "'wmod_nocls' has no attribute 'Nope'"


def test_missing_nested_attribute(workdir):
    module(workdir, "wmod_nonest", WORKER_MODULE)
    with pytest.raises(WorkerSpecError, match="'wmod_nonest.Outer' has no attribute 'Missing'"):
        load_worker("wmod_nonest:Outer.Missing")


@pytest.mark.parametrize("name", ["NOT_CALLABLE", "NotAWorker('A')", "make_worker('A')", "Outer"])
def test_not_a_roundrobin_class_is_refused_uncalled(workdir, name):
    module(workdir, "wmod_notcall", WORKER_MODULE)
    with pytest.raises(WorkerSpecError) as info:
        load_worker(f"wmod_notcall:{name}")
    assert str(info.value) == (
        f"worker 'wmod_notcall:{name.partition('(')[0]}' is not a class deriving from redbike.RoundRobin"
    )


def test_constructor_returning_something_else(workdir):
    module(workdir, "wmod_sneaky", WORKER_MODULE)
    with pytest.raises(WorkerSpecError, match="did not create a redbike.RoundRobin"):
        load_worker("wmod_sneaky:Sneaky")


@pytest.mark.parametrize(
    "spec",
    [
        "os:system('touch {marker}')",
        "builtins:exec('open(\"{marker}\", \"w\").close()')",
        "builtins:open('{marker}', 'w')",
        "subprocess:call(['touch', '{marker}'])",
        "sys:exit(0)",
        "builtins:dict",
        "builtins:type('X', (), {{}})",
    ],
)
def test_any_callable_is_never_called(workdir, spec):
    marker = workdir / "side_effect"
    with pytest.raises(WorkerSpecError, match="is not a class deriving from redbike.RoundRobin") as info:
        load_worker(spec.format(marker=marker))
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_module_raising_at_import(workdir):
    module(workdir, "wmod_raises", "raise RuntimeError('no config\\nfor you')\n")
    with pytest.raises(WorkerSpecError) as info:
        load_worker("wmod_raises:Echo")
    assert str(info.value) == (
        "cannot import worker module 'wmod_raises': RuntimeError: no config for you"
    )


def test_module_with_syntax_error(workdir):
    module(workdir, "wmod_syntax", "def broken(:\n    pass\n")
    with pytest.raises(
        WorkerSpecError, match="cannot import worker module 'wmod_syntax': SyntaxError"
    ):
        load_worker("wmod_syntax:Echo")


def test_constructor_raising(workdir):
    module(workdir, "wmod_ctor", WORKER_MODULE)
    with pytest.raises(WorkerSpecError) as info:
        load_worker("wmod_ctor:Broken('A:B')")
    assert str(info.value) == "cannot create worker 'wmod_ctor:Broken': ValueError: bad init A:B"


def test_constructor_wrong_arguments(workdir):
    module(workdir, "wmod_args", WORKER_MODULE)
    with pytest.raises(
        WorkerSpecError, match="cannot create worker 'wmod_args:Outer.Inner': TypeError"
    ):
        load_worker("wmod_args:Outer.Inner()")
