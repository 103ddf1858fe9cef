"""The config groups: each schema lives with its package, one validation pass covers them all, and importing
the composition module stays light."""

import json
import subprocess
import sys

import pytest

from modular.cli import main


def test_import_modular_config_loads_no_export_or_continual_module():
    code = "import sys, json, modular.config; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
    # The two packages' config schemas are part of the root Config; nothing else of them may load.
    heavy = [m for m in loaded if m.startswith(("modular.export", "modular.continual"))
             and m not in ("modular.export", "modular.export.config", "modular.continual", "modular.continual.config")]
    assert heavy == []
    assert "transformers" not in loaded


def test_each_group_schema_lives_with_its_package_and_is_re_exported():
    import modular.config as config
    from modular.experts.config import ExpertsConfig
    from modular.kernels.config import KernelsConfig
    from modular.models.config import ModelConfig
    from modular.routing.config import RoutingConfig
    from modular.run.config import RunConfig

    assert (config.ModelConfig, config.ExpertsConfig, config.RoutingConfig, config.KernelsConfig,
            config.RunConfig) == (ModelConfig, ExpertsConfig, RoutingConfig, KernelsConfig, RunConfig)
    for group, schema in config.GROUP_SCHEMAS.items():
        assert schema.__module__.endswith(".config"), (group, schema.__module__)


@pytest.mark.parametrize("override,fragment", [
    ("continual.strategy=bogus", "continual.strategy='bogus' is unknown"),
    ("continual.init=clone", "continual.init='clone' is unknown"),
    ("continual.freeze=[everything]", "continual.freeze contains 'everything'"),
    ("continual.replay=1.5", "continual.replay=1.5"),
    ("continual.steps_per_stage=0", "continual.steps_per_stage=0"),
])
def test_the_continual_group_is_validated_at_compose_time(override, fragment, capsys):
    """Every command refuses a bad continual value, not only `modular continual`."""
    assert main(["info", "model=tiny", override]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_continual_checks_that_need_other_groups_wait_for_modular_continual(capsys):
    """The default stream (en, de, code_py) needs domains data=sample_en lacks: only a continual run cares."""
    from modular.config import compose_config

    compose_config(["model=tiny", "data=sample_en"])  # composes
    compose_config(["model=dense"])  # the default strategy grows experts; a dense model is fine to train
    assert main(["continual", "model=tiny", "data=sample_en", "run.dir=/nonexistent/never"]) == 2
    assert "continual.stream names domain 'de'" in capsys.readouterr().err
