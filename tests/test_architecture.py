"""The import and size rules (scripts/check_imports.py, scripts/check_sizes.py) hold, and the checkers fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_imports.py"


def run(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("campaigns", "tasks", "web", "sendgrid_sink"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_the_tree_keeps_the_import_rules():
    result = run(ROOT)
    assert result.returncode == 0, result.stderr


def test_a_cycle_through_a_function_level_import_is_named(tmp_path):
    write(tmp_path, {
        "campaigns/a.py": "from . import b\n",
        "campaigns/b.py": "def f():\n    from .c import g\n",
        "campaigns/c.py": "from campaigns.a import x\n",
    })
    result = run(tmp_path)
    assert result.returncode == 1
    assert "import cycle: campaigns.a -> campaigns.b -> campaigns.c -> campaigns.a" in result.stderr


def test_a_task_module_importing_its_package_that_imports_it_is_a_cycle(tmp_path):
    write(tmp_path, {
        "tasks/__init__.py": "huey = None\nfrom . import jobs\n",
        "tasks/jobs.py": "from . import huey\n",
    })
    result = run(tmp_path)
    assert result.returncode == 1 and "import cycle: tasks -> tasks.jobs -> tasks" in result.stderr


def test_lower_layers_never_import_higher_ones(tmp_path):
    write(tmp_path, {
        "campaigns/x.py": "def f():\n    import flask\n    from tasks import huey\n",
        "campaigns/y.py": "from huey import crontab\n",
        "tasks/t.py": "from web.db import get_db\n",
    })
    err = run(tmp_path).stderr
    assert "campaigns/x.py:2: campaigns/ must not import flask" in err
    assert "campaigns/x.py:3: campaigns/ must not import tasks" in err
    assert "campaigns/y.py:1: campaigns/ must not import huey" in err
    assert "tasks/t.py:1: tasks/ must not import web.db" in err


def test_web_cycles_fail_too(tmp_path):
    write(tmp_path, {"web/ui.py": "from . import views\n", "web/views.py": "from .ui import bp\n"})
    result = run(tmp_path)
    assert result.returncode == 1
    assert "import cycle: web.ui -> web.views -> web.ui" in result.stderr


def test_the_sink_stands_alone(tmp_path):
    write(tmp_path, {"sendgrid_sink/app.py": "from campaigns.config import get_settings\n"})
    result = run(tmp_path)
    assert result.returncode == 1
    assert "sendgrid_sink/app.py:1: sendgrid_sink/ must not import campaigns.config" in result.stderr


SIZES = ROOT / "scripts" / "check_sizes.py"


def sizes(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SIZES), str(root)], capture_output=True, text=True, timeout=60)


def a_function(name: str, length: int) -> str:
    """A function of exactly ``length`` lines, counted from its ``def``."""
    return f"def {name}():\n" + "    x = 1\n" * (length - 1)


def test_the_tree_keeps_the_size_rules():
    result = sizes(ROOT)
    assert result.returncode == 0, result.stderr


def test_a_function_over_80_lines_is_named_with_its_length(tmp_path):
    write(tmp_path, {"campaigns/big.py": a_function("fine", 80) + "\n\n" + a_function("too_long", 81)})
    result = sizes(tmp_path)
    assert result.returncode == 1
    assert "campaigns/big.py:83: function too_long is 81 lines" in result.stderr
    assert "fine" not in result.stderr


def test_a_long_comment_allows_a_long_function(tmp_path):
    write(tmp_path, {
        "web/big.py": "import functools\n\n\n# long: one SQL statement per step, read top to bottom\n"
                      "@functools.cache\n" + a_function("long_one", 120),
        "tasks/big.py": "# long: a reason on the def's own line above it\n" + a_function("other", 90),
    })
    result = sizes(tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_module_over_600_lines_is_named(tmp_path):
    body = "".join(a_function(f"f{i}", 5) + "\n\n" for i in range(90))  # 90 * 7 = 630 lines
    write(tmp_path, {"sendgrid_sink/big.py": body, "campaigns/waived.py": "# long: generated tables\n" + body})
    result = sizes(tmp_path)
    assert result.returncode == 1
    assert "sendgrid_sink/big.py: module is 630 lines" in result.stderr
    assert "waived" not in result.stderr
