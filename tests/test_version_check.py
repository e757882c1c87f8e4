"""Importing megatron_fold with an unsupported megatron-core names both versions."""

import pytest

import megatron_fold


@pytest.mark.parametrize("installed", ["0.18.2", "0.20.0", "1.0.0"])
def test_unsupported_megatron_core_is_named(monkeypatch, installed):
    monkeypatch.setattr(megatron_fold._metadata, "version", lambda name: installed)
    with pytest.raises(ImportError) as e:
        megatron_fold._check_megatron_core_version()
    assert f"megatron-core {installed} is installed" in str(e.value)
    assert ">=0.19,<0.20" in str(e.value)


def test_missing_megatron_core(monkeypatch):
    def missing(name):
        raise megatron_fold._metadata.PackageNotFoundError(name)

    monkeypatch.setattr(megatron_fold._metadata, "version", missing)
    with pytest.raises(ImportError, match="megatron-core is not installed"):
        megatron_fold._check_megatron_core_version()


@pytest.mark.parametrize("installed", ["0.19.0", "0.19.2", "0.19.3rc1"])
def test_supported_versions_pass(monkeypatch, installed):
    monkeypatch.setattr(megatron_fold._metadata, "version", lambda name: installed)
    megatron_fold._check_megatron_core_version()
