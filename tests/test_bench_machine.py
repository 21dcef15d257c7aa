"""experiments/machine.py: the idle-machine warning every benchmark prints, and the CPU model."""

import json
import os

import pytest

from experiments import machine


def _loads(monkeypatch, *one_minute, rest=(0.0, 0.0)):
  """os.getloadavg returns (x, *rest) for each x of `one_minute` in turn."""
  values = iter([(x, *rest) for x in one_minute])
  monkeypatch.setattr(os, "getloadavg", lambda: next(values))


@pytest.mark.parametrize(
    "before, after, idle",
    [
        (0.1, 0.2, True),
        (0.5, 0.5, True),  # at the threshold is still idle
        (0.3, 2.5, True),  # the benchmark's own 2 threads, and at the threshold after
        (0.7, 0.2, False),
        (0.2, 2.51, False),  # more than the benchmark's own threads: another job ran
        (2.0, 3.0, False),
    ],
)
def test_warning_when_the_one_minute_load_exceeds_the_threshold(
    monkeypatch, capsys, before, after, idle
):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # 2 usable cores
  _loads(monkeypatch, before, after)
  info = machine.end(machine.begin())
  assert info["load_before"][0] == before and info["load_after"][0] == after
  assert info["idle"] is idle and (info["warning"] is None) is idle
  text = machine.describe(info)
  assert ("WARNING" in text) is not idle
  assert text.splitlines()[0].startswith(f"machine: {machine.cpu_model()}, {os.cpu_count()} cores")
  assert f"before {before:.2f}, 0.00, 0.00, after {after:.2f}, 0.00, 0.00" in text
  if not idle:
    assert text.splitlines()[-1] == info["warning"]
    limits = machine.idle_limits(info)
    assert limits == {"before": 0.5, "after": 2.5}
    assert all(
        f"{x:.2f} {k} (above {limits[k]:g})" in info["warning"]
        for k, x in (("before", before), ("after", after))
        if x > limits[k]
    )
  # begin() warns at once when the machine is already loaded.
  assert ("WARNING" in capsys.readouterr().out) is (before > machine.IDLE_LOAD)
  assert json.loads(json.dumps(info)) == info


def test_only_the_one_minute_load_counts(monkeypatch):
  _loads(monkeypatch, 0.3, 0.3, rest=(4.0, 4.0))
  assert machine.end(machine.begin())["idle"]


@pytest.mark.parametrize(
    "cpuinfo, model",
    [
        (
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t: fpu\n",
            "Intel(R) Xeon(R) CPU @ 2.20GHz",
        ),
        (
            "processor\t: 0\nBogoMIPS\t: 50.00\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n",
            "BCM2835",
        ),
    ],
)
def test_cpu_model_from_cpuinfo(monkeypatch, tmp_path, cpuinfo, model):
  path = tmp_path / "cpuinfo"
  path.write_text(cpuinfo)
  monkeypatch.setattr(machine, "CPUINFO", str(path))
  assert machine.cpu_model() == model


def test_cpu_model_without_cpuinfo(monkeypatch, tmp_path):
  monkeypatch.setattr(machine, "CPUINFO", str(tmp_path / "missing"))
  monkeypatch.setattr(machine.platform, "processor", lambda: "")
  monkeypatch.setattr(machine.platform, "machine", lambda: "arm64")
  assert machine.cpu_model() == "arm64"


@pytest.mark.parametrize(
    "cpuinfo, isa",
    [
        ("model name\t: AMD EPYC\nflags\t: fpu sse4_2 avx avx2 avx512f avx512dq\n", "avx512f"),
        ("model name\t: AMD EPYC\nflags\t: fpu sse4_2 avx avx2 fma\n", "avx2"),
        ("processor\t: 0\nFeatures\t: fp asimd sve sve2\nCPU part\t: 0xd4f\n", "sve2"),
        ("processor\t: 0\nFeatures\t: fp asimd evtstrm\n", "asimd"),
        ("processor\t: 0\n", "unknown"),
    ],
)
def test_vector_isa_is_the_widest_extension_listed(monkeypatch, tmp_path, cpuinfo, isa):
  path = tmp_path / "cpuinfo"
  path.write_text(cpuinfo)
  monkeypatch.setattr(machine, "CPUINFO", str(path))
  assert machine.vector_isa() == isa
  assert machine.cpu_kind().endswith(f" ({isa})")
