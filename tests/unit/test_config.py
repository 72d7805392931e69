"""Config loading: drop-in merge, validation errors with file and key path, exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.cli import main
from patchd.config import ConfigError, load_settings
from patchd.config.files import Merged, load_merged
from patchd.config.types import Limit

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BAD = sorted((CONFIGS / "bad").glob("*.toml"))
ROOT = Path(__file__).resolve().parents[2]


def expectations(path: Path) -> list[str]:
    return [
        line.removeprefix("# expect:").strip()
        for line in path.read_text().splitlines()
        if line.startswith("# expect:")
    ]


def test_there_are_at_least_twenty_broken_configs() -> None:
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_broken_config_exits_2_with_key_path(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wanted = expectations(path)
    assert wanted, f"{path.name} has no '# expect:' line"
    code = main(["check-config", "-c", str(path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    for text in wanted:
        assert f"{path}: {text}" in err, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("config invalid:")


def test_broken_config_as_a_process_has_no_traceback() -> None:
    path = CONFIGS / "bad" / "21-after-cycle.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "patchd.cli", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}: groups.a.after: cycle in after: a -> c -> b -> a" in proc.stderr


@pytest.mark.parametrize("name", ["patchd.example.toml", "lab.toml"])
def test_shipped_configs_are_valid(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", str(ROOT / "config" / name)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config OK: 1 file,")


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(CONFIGS / "bad" / "24-percent-over-100.toml")
    paths = {".".join(issue.path) for issue in info.value.issues}
    assert paths == {"groups.web.max_concurrency", "groups.web.max_errors"}


def test_dropins_merge_deeply_and_errors_name_the_dropin(tmp_path: Path) -> None:
    main_file = CONFIGS / "dropin" / "patchd.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(main_file, CONFIGS / "dropin" / "patchd.d")
    [issue] = info.value.issues
    assert issue.file == CONFIGS / "dropin" / "patchd.d" / "20-web.toml"
    assert str(issue).endswith(
        "patchd.d/20-web.toml: groups.web.window: unknown window 'nightly' "
        "(known: weekend, monthly)"
    )

    # Without the broken drop-in the merge is valid, and deep.
    dropins = tmp_path / "patchd.d"
    dropins.mkdir()
    shutil.copy(CONFIGS / "dropin" / "patchd.d" / "10-daemon.toml", dropins)
    (dropins / "30-web.toml").write_text('[groups.web]\nwindow = "monthly"\n')
    settings = load_settings(main_file, dropins)
    assert settings.daemon.log_level == "debug"
    assert settings.daemon.timezone.key == "Europe/Berlin"
    web = settings.groups["web"]
    assert web.window == "monthly"
    assert web.backend == "local"
    assert web.max_concurrency == Limit(count=2)
    assert web.health.timeout == timedelta(minutes=10)
    assert web.health.stable_for == timedelta(seconds=20)
    assert settings.files == (main_file, dropins / "10-daemon.toml", dropins / "30-web.toml")


def test_later_file_wins_and_provenance_follows(tmp_path: Path) -> None:
    first = tmp_path / "a.toml"
    second = tmp_path / "b.toml"
    first.write_text('[windows.w]\ndays = ["sat"]\nduration = "1h"\n')
    second.write_text('[windows.w]\nduration = "bad"\n')
    merged: Merged = load_merged([first, second])
    assert merged.data == {"windows": {"w": {"days": ["sat"], "duration": "bad"}}}
    assert merged.file_for(("windows", "w", "days")) == first
    assert merged.file_for(("windows", "w", "duration")) == second
    # A later scalar replacing a table drops the table's old provenance.
    third = tmp_path / "c.toml"
    third.write_text('windows = "x"\n')
    merged = load_merged([first, third])
    assert merged.file_for(("windows", "w", "days")) == third


def test_syntax_errors_in_several_files_are_all_reported(tmp_path: Path) -> None:
    (tmp_path / "patchd.d").mkdir()
    main_file = tmp_path / "patchd.toml"
    main_file.write_text("[daemon\n")
    (tmp_path / "patchd.d" / "10.toml").write_text("x = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(main_file, tmp_path / "patchd.d")
    assert [issue.file for issue in info.value.issues] == [
        main_file,
        tmp_path / "patchd.d" / "10.toml",
    ]
    assert all("line 1, column" in str(issue) for issue in info.value.issues)


def test_missing_files_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "-c", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err
    assert main(["check-config", "--config-dir", str(tmp_path / "nodir")]) == 2
    assert "nodir: no such directory" in capsys.readouterr().err


def test_defaults(tmp_path: Path) -> None:
    path = tmp_path / "min.toml"
    path.write_text(
        '[windows.w]\ndays = ["sat"]\nduration = "1h"\n'
        '[backends.d]\ntype = "docker"\n'
        '[groups.g]\nbackend = "d"\nwindow = "w"\n'
    )
    settings = load_settings(path)
    assert settings.daemon.metrics_host == "127.0.0.1"
    assert settings.daemon.metrics_port == 9863
    assert settings.daemon.timezone.key == "UTC"
    assert str(settings.daemon.state_dir) == "/var/lib/patchd"
    group = settings.groups["g"]
    assert group.max_concurrency == Limit(count=1)
    assert group.max_errors == Limit(count=1)
    assert group.health.timeout == timedelta(minutes=5)
    assert settings.backends["d"].config.model_dump()["url"] == "unix:///var/run/docker.sock"


def test_freeze_dates_are_local_whole_days(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text(
        '[daemon]\ntimezone = "America/New_York"\n'
        "[freezes.xmas]\nstart = 2026-12-20\nend = 2026-12-31\n"
        "[freezes.launch]\nstart = 2026-06-01T10:00:00+02:00\nend = 2026-06-01T12:00:00Z\n"
    )
    freezes = {f.name: f for f in load_settings(path).freezes}
    assert freezes["xmas"].start == datetime(2026, 12, 20, 5, tzinfo=UTC)
    assert freezes["xmas"].end == datetime(2027, 1, 1, 5, tzinfo=UTC)  # end date inclusive
    assert freezes["launch"].start == datetime(2026, 6, 1, 8, tzinfo=UTC)
    assert freezes["launch"].end == datetime(2026, 6, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [(3, 40, 3), ("25%", 40, 10), ("25%", 3, 1), ("100%", 7, 7), ("10%", 15, 1), ("33.5%", 10, 3)],
)
def test_limits_resolve(text: int | str, total: int, expected: int, tmp_path: Path) -> None:
    path = tmp_path / "l.toml"
    value = f'"{text}"' if isinstance(text, str) else str(text)
    path.write_text(
        '[windows.w]\ndays = ["sat"]\nduration = "1h"\n[backends.d]\ntype = "docker"\n'
        f'[groups.g]\nbackend = "d"\nwindow = "w"\nmax_concurrency = {value}\n'
    )
    assert load_settings(path).groups["g"].max_concurrency.resolve(total) == expected
