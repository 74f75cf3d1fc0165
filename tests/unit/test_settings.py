"""settings.py: load_config precedence (defaults < file < env < flags) and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from steadyserve.config import DEFAULT_SERVICE, RISK_SERVICE, Config
from steadyserve.errors import ConfigError
from steadyserve.settings import deployment_name_for, load_config

FILE = """
data_dir = "/var/lib/steadyserve"
log_level = "warning"
[gateway]
host = "0.0.0.0"
port = 7000
[supervisor]
restart_cap_s = 5
[deployments.embed]
service = "app.py:Embedder"
replicas = 3
balancer = "peak_ewma"
[deployments.embed.env]
HF_HOME = "/models"
OMP_PROC_BIND = 1
[deployments.rerank]
service = "app.py:Reranker"
"""


def write(tmp_path: Path, text: str, name: str = "steadyserve.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, **kwargs) -> Config:
    kwargs.setdefault("cwd", tmp_path)
    kwargs.setdefault("env", {})
    return load_config(**kwargs)


# --- defaults ---------------------------------------------------------------------------------

def test_defaults_without_target_or_file(tmp_path):
    config = load(tmp_path)
    assert [d.name for d in config.deployments] == ["minilm", "risk"]  # the two examples
    assert config.deployments[1].service == RISK_SERVICE
    assert config.deployments[1].calls == ("minilm", "risk")  # its assess pipeline
    d = config.deployments[0]
    assert (d.name, d.service, d.replicas, d.balancer) == ("minilm", DEFAULT_SERVICE, 2, "power_of_two")
    assert (config.gateway.host, config.gateway.port) == ("127.0.0.1", 8000)
    assert (config.data_dir, config.log_level, config.log_format) == (".steadyserve", "info", "auto")


def test_default_deployment_takes_name_replicas_balancer_flags(tmp_path):
    config = load(tmp_path, flags={"name": "emb", "replicas": 4, "balancer": "round_robin"})
    d = config.deployments[0]
    assert (d.name, d.service, d.replicas, d.balancer) == ("emb", DEFAULT_SERVICE, 4, "round_robin")


def test_none_flags_mean_not_given(tmp_path):
    config = load(tmp_path, flags={"name": None, "replicas": None, "port": None, "log_level": None})
    assert config.deployments[0].name == "minilm"
    assert config.deployments[0].replicas == 2
    assert config.gateway.port == 8000
    assert config.log_level == "info"


# --- target -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("target", "name"),
    [
        pytest.param("x.py:MyModel", "my-model", id="camel-case"),
        pytest.param("pkg.mod:Embedder", "embedder", id="module-target"),
        pytest.param("x.py:BERTModel", "b-e-r-t-model", id="acronym"),
        pytest.param("x.py:my_model", "my_model", id="snake-case"),
        pytest.param("x.py:Café", "caf-", id="non-ascii-replaced"),
        pytest.param("x.py:", "service", id="empty-class-falls-back"),
    ],
)
def test_deployment_name_for(target, name):
    assert deployment_name_for(target) == name


def test_target_makes_one_deployment_with_one_replica(tmp_path):
    config = load(tmp_path, target="x.py:MyModel")
    assert len(config.deployments) == 1
    d = config.deployments[0]
    assert (d.name, d.service, d.replicas, d.balancer) == ("my-model", "x.py:MyModel", 1, "power_of_two")


def test_target_flags(tmp_path):
    config = load(tmp_path, target="x.py:MyModel",
                  flags={"name": "m", "replicas": 3, "balancer": "peak_ewma"})
    d = config.deployments[0]
    assert (d.name, d.replicas, d.balancer) == ("m", 3, "peak_ewma")


def test_target_ignores_steadyserve_toml_in_cwd(tmp_path):
    write(tmp_path, FILE)
    config = load(tmp_path, target="x.py:MyModel")
    assert [d.name for d in config.deployments] == ["my-model"]
    assert config.gateway.port == 8000


def test_target_without_class_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="service must be"):
        load(tmp_path, target="model.py")


# --- file -------------------------------------------------------------------------------------

def test_file_is_read(tmp_path):
    config = load(tmp_path, config_path=str(write(tmp_path, FILE, "other.toml")))
    assert (config.gateway.host, config.gateway.port) == ("0.0.0.0", 7000)
    assert config.supervisor.restart_cap_s == 5
    assert (config.data_dir, config.log_level) == ("/var/lib/steadyserve", "warning")
    embed, rerank = config.deployments
    assert (embed.name, embed.service, embed.replicas, embed.balancer) == (
        "embed", "app.py:Embedder", 3, "peak_ewma")
    assert (rerank.name, rerank.service, rerank.replicas) == ("rerank", "app.py:Reranker", 1)


def test_deployment_env_table_becomes_string_pairs(tmp_path):
    config = load(tmp_path, config_path=str(write(tmp_path, FILE)))
    assert config.deployment("embed").env == (("HF_HOME", "/models"), ("OMP_PROC_BIND", "1"))
    assert config.deployment("rerank").env == ()


def test_calls_lists_the_deployments_a_deployment_calls(tmp_path):
    config = load(tmp_path, config_path=str(write(tmp_path, """
[deployments.risk]
service = "app.py:Risk"
calls = ["minilm", "risk"]
[deployments.minilm]
service = "app.py:Embedder"
""")))
    assert config.deployment("risk").calls == ("minilm", "risk")
    assert config.deployment("minilm").calls == ()
    with pytest.raises(ConfigError, match="not configured deployments"):
        load(tmp_path, config_path=str(write(tmp_path, """
[deployments.risk]
service = "app.py:Risk"
calls = ["minilm"]
""")))


def test_auto_discovers_steadyserve_toml_in_cwd(tmp_path):
    write(tmp_path, FILE)
    config = load(tmp_path)
    assert [d.name for d in config.deployments] == ["embed", "rerank"]
    assert config.gateway.port == 7000


def test_no_auto_discovery_of_other_names(tmp_path):
    write(tmp_path, FILE, "steadyserve.yaml.toml")
    assert [d.name for d in load(tmp_path).deployments] == ["minilm", "risk"]


def test_file_without_deployments_falls_back_to_default_deployment(tmp_path):
    write(tmp_path, "[gateway]\nport = 9000\n")
    config = load(tmp_path)
    assert [(d.name, d.replicas) for d in config.deployments] == [("minilm", 2), ("risk", 1)]
    assert config.gateway.port == 9000


# --- precedence: defaults < file < env < flags ------------------------------------------------

@pytest.mark.parametrize(
    ("file", "env", "flags", "port"),
    [
        pytest.param(False, None, None, 8000, id="default"),
        pytest.param(True, None, None, 7000, id="file"),
        pytest.param(True, "7100", None, 7100, id="env-over-file"),
        pytest.param(False, "7100", None, 7100, id="env-over-default"),
        pytest.param(True, "7100", 7200, 7200, id="flag-over-env"),
        pytest.param(True, None, 7200, 7200, id="flag-over-file"),
    ],
)
def test_port_precedence(tmp_path, file, env, flags, port):
    if file:
        write(tmp_path, FILE)
    config = load(tmp_path, env={"STEADYSERVE_PORT": env} if env else {},
                  flags={"port": flags} if flags else {})
    assert config.gateway.port == port


@pytest.mark.parametrize(
    ("env", "flags", "expected"),
    [
        pytest.param({}, {}, ("0.0.0.0", "warning", "auto", "/var/lib/steadyserve"), id="file-only"),
        pytest.param({"STEADYSERVE_HOST": "10.0.0.1", "STEADYSERVE_LOG_LEVEL": "debug",
                      "STEADYSERVE_LOG_FORMAT": "json", "STEADYSERVE_DATA_DIR": "/env"}, {},
                     ("10.0.0.1", "debug", "json", "/env"), id="env-over-file"),
        pytest.param({"STEADYSERVE_HOST": "10.0.0.1", "STEADYSERVE_LOG_LEVEL": "debug",
                      "STEADYSERVE_LOG_FORMAT": "json"},
                     {"host": "::", "log_level": "error", "log_format": "text", "data_dir": "/flag"},
                     ("::", "error", "text", "/flag"), id="flags-over-env"),
    ],
)
def test_host_and_top_level_precedence(tmp_path, env, flags, expected):
    write(tmp_path, FILE)
    config = load(tmp_path, env=env, flags=flags)
    assert (config.gateway.host, config.log_level, config.log_format, config.data_dir) == expected


def test_max_body_bytes_flag(tmp_path):
    assert load(tmp_path, flags={"max_body_bytes": 4096}).gateway.max_body_bytes == 4096


def test_unprefixed_env_is_ignored(tmp_path):
    assert load(tmp_path, env={"PORT": "1", "HOST": "x"}).gateway.port == 8000


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("[gatway]\nport = 1\n", "unknown section 'gatway'", id="unknown-section"),
        pytest.param("[gateway]\nprot = 1\n", r"\[gateway\]: unknown setting 'prot'",
                     id="unknown-gateway-key"),
        pytest.param("[supervisor]\nrestart = 1\n", r"\[supervisor\]: unknown setting 'restart'",
                     id="unknown-supervisor-key"),
        pytest.param('[deployments.a]\nservice = "m:C"\nreplica = 2\n',
                     r"\[deployments.a\]: unknown setting 'replica'", id="unknown-deployment-key"),
        pytest.param("[deployments.a]\nreplicas = 2\n", r"\[deployments.a\]:.*service",
                     id="deployment-missing-service"),
        pytest.param("[deployments]\na = 1\n", r"\[deployments.a\] must be a table",
                     id="deployment-not-table"),
        pytest.param("[gateway\nport = 1\n", "invalid TOML", id="bad-toml"),
        pytest.param('[gateway]\nport = "eighty"\n', r"\[gateway\]", id="wrong-type-in-file"),
        pytest.param("[gateway]\nport = 70000\n", "port must be 0..65535", id="bad-port-in-file"),
        pytest.param('[deployments."Bad Name"]\nservice = "m:C"\n', "deployment name 'Bad Name'",
                     id="bad-deployment-name"),
        pytest.param('log_format = "xml"\n', "log_format", id="bad-log-format"),
    ],
)
def test_bad_file_is_config_error(tmp_path, text, match):
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=match):
        load(tmp_path)


def test_missing_config_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path, config_path=str(tmp_path / "nope.toml"))


@pytest.mark.parametrize(
    ("env", "match"),
    [
        pytest.param({"STEADYSERVE_PORT": "eighty"}, "STEADYSERVE_PORT must be int", id="port-not-int"),
        pytest.param({"STEADYSERVE_PORT": "8000.5"}, "STEADYSERVE_PORT must be int", id="port-float"),
        pytest.param({"STEADYSERVE_PORT": "99999"}, "port must be 0..65535", id="port-out-of-range"),
        pytest.param({"STEADYSERVE_LOG_LEVEL": "loud"}, "log_level", id="bad-log-level"),
    ],
)
def test_bad_env_is_config_error(tmp_path, env, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, env=env)


@pytest.mark.parametrize("text", ["gateway = 5\n", 'gateway = "x"\n', "deployments = 3\n"],
                         ids=["gateway-int", "gateway-str", "deployments-int"])
def test_non_table_section_is_config_error(tmp_path, text):
    write(tmp_path, text)
    with pytest.raises(ConfigError):
        load(tmp_path)


# --- [cache] ----------------------------------------------------------------------------------


def test_cache_section_flag_and_env_for_redis(tmp_path):
    write(tmp_path, '[cache]\nl1_bytes = 1048576\npolicy = "lru"\nredis_url = "redis://file:6379/0"\n')
    config = load(tmp_path)
    assert (config.cache.l1_bytes, config.cache.policy, config.cache.redis_url) == (
        1048576, "lru", "redis://file:6379/0")
    env = {"STEADYSERVE_REDIS_URL": "redis://env:6379/1"}
    assert load(tmp_path, env=env).cache.redis_url == "redis://env:6379/1"
    flags = {"redis_url": "redis://flag:6379/2"}
    assert load(tmp_path, env=env, flags=flags).cache.redis_url == "redis://flag:6379/2"
    assert load(tmp_path, env={"STEADYSERVE_REDIS_URL": ""}).cache.redis_url is None


@pytest.mark.parametrize(("text", "message"), [
    ('[cache]\npolicy = "lfu"\n', "policy must be one of"),
    ('[cache]\nredis_url = "http://x"\n', "redis_url must be"),
    ("[cache]\nl1_min_bytes = 10\nl1_max_bytes = 5\n", "l1_min_bytes <= l1_max_bytes"),
    ("[cache]\naffinity_balance = 0.5\n", "affinity_balance"),
    ("[cache]\nstale_if_error_s = -1\n", "stale windows"),
    ("[cache]\nbogus = 1\n", "unknown setting 'bogus'"),
    ('cache = "on"\n', "[cache] must be a table"),
])
def test_bad_cache_settings_are_refused_with_the_reason(tmp_path, text, message):
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path)


# --- autoscaling ------------------------------------------------------------------------------

def test_an_autoscale_table_configures_the_deployment(tmp_path):
    write(tmp_path, """
[deployments.embed]
service = "app.py:Embedder"
[deployments.embed.autoscale]
min_replicas = 0
max_replicas = 6
target_ongoing_requests = 4
downscale_delay_s = 120
""")
    d = load(tmp_path).deployments[0]
    assert d.autoscale is not None
    assert (d.autoscale.min_replicas, d.autoscale.max_replicas) == (0, 6)
    assert (d.autoscale.target_ongoing_requests, d.autoscale.downscale_delay_s) == (4, 120)
    assert d.autoscale.upscale_delay_s == 3.0  # the default


@pytest.mark.parametrize("table,match", [
    ("min_replicas = -1", r"\[deployments.embed.autoscale\]: min_replicas must be >= 0"),
    ("max_replicas = 0", r"\[deployments.embed.autoscale\]: max_replicas"),
    ("panic_window_s = 60", r"\[deployments.embed.autoscale\]: need 0 < panic_window_s"),
    ("targets = 3", r"\[deployments.embed.autoscale\]: unknown setting 'targets'"),
])
def test_a_bad_autoscale_table_names_the_table_and_the_field(tmp_path, table, match):
    write(tmp_path, f"""
[deployments.embed]
service = "app.py:Embedder"
[deployments.embed.autoscale]
{table}
""")
    with pytest.raises(ConfigError, match=match):
        load(tmp_path)


def test_autoscale_min_over_the_deployment_max_is_refused(tmp_path):
    write(tmp_path, """
[deployments.embed]
service = "app.py:Embedder"
max_replicas = 2
[deployments.embed.autoscale]
min_replicas = 3
""")
    with pytest.raises(ConfigError, match="min_replicas \\(3\\) is over max_replicas \\(2\\)"):
        load(tmp_path)


# --- backend ----------------------------------------------------------------------------------

def test_the_ray_backend_from_the_file_and_from_flags(tmp_path):
    write(tmp_path, """
backend = "ray"
ray_address = "10.0.0.5:6379"
[deployments.embed]
service = "app.py:Embedder"
num_cpus = 2
num_gpus = 0.5
memory_bytes = 2000000000
""")
    config = load(tmp_path)
    assert (config.backend, config.ray_address) == ("ray", "10.0.0.5:6379")
    d = config.deployments[0]
    assert (d.num_cpus, d.num_gpus, d.memory_bytes) == (2, 0.5, 2_000_000_000)
    flagged = load(tmp_path, target="app.py:M", flags={"backend": "ray", "ray_address": "h:1"})
    assert (flagged.backend, flagged.ray_address) == ("ray", "h:1")
    with pytest.raises(ConfigError, match="backend must be one of"):
        load(tmp_path, target="app.py:M", flags={"backend": "k8s"})


def test_placement_bundles_from_the_file(tmp_path):
    write(tmp_path, """
backend = "ray"
[deployments.llm]
service = "app.py:Llm"
num_cpus = 1
num_gpus = 1
placement_bundles = [{CPU = 1, GPU = 1}, {GPU = 1}]
placement_strategy = "STRICT_PACK"
""")
    d = load(tmp_path).deployments[0]
    assert d.placement_bundles == ((("CPU", 1.0), ("GPU", 1.0)), (("GPU", 1.0),))
    assert d.placement_strategy == "STRICT_PACK"


@pytest.mark.parametrize(("table", "error"), [
    ('placement_bundles = {CPU = 1}', "must be a list of tables"),
    ('placement_bundles = [1, 2]', "must be a list of tables"),
    ('placement_bundles = [{CPU = "lots"}]', "CPU must be a number"),
    ('placement_bundles = [{CPU = true}]', "CPU must be a number"),
    ('placement_bundles = [{CPU = 0}]', "an amount > 0"),
    ('placement_bundles = [{CPU = -1}]', "an amount > 0"),
    ('placement_bundles = [{"bad name!" = 1}]', "a resource name"),
    ('placement_bundles = [{}]', "1 to 16 resources"),
    ('placement_bundles = [{GPU = 1}]', "must hold its num_cpus"),  # num_cpus = 1, no CPU
    ('num_gpus = 2\nplacement_bundles = [{CPU = 1, GPU = 1}, {GPU = 1}]', "num_gpus \\(2\\)"),
    ('placement_strategy = "ANYWHERE"', "placement_strategy must be one of"),
])
def test_bad_placement_is_refused_with_the_reason(tmp_path, table, error):
    write(tmp_path, f"""
[deployments.llm]
service = "app.py:Llm"
{table}
""")
    with pytest.raises(ConfigError, match=error):
        load(tmp_path)


def test_ray_is_an_optional_extra_never_imported_by_the_local_backend():
    import subprocess
    import sys
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    base = project["project"]["dependencies"]
    assert not [d for d in base if d.split("[")[0].split(">")[0].split("=")[0].strip() == "ray"]
    assert any(d.startswith("ray") for d in project["project"]["optional-dependencies"]["ray"])
    code = ("import sys; import steadyserve.gateway.assemble, steadyserve.cli.run, "
            "steadyserve.control.supervisor; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_the_example_configuration_loads():
    config = load_config(config_path=str(Path(__file__).resolve().parents[2] / "examples" /
                                         "steadyserve.toml"), env={})
    echo = config.deployment("echo")
    assert echo.autoscale is not None and echo.autoscale.min_replicas == 0
