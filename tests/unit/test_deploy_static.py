"""Static checks of the deployment files; no Docker, PostgreSQL or Redis needed.

Covers docker-compose.yml, the Dockerfile (hadolint), the NGINX template and its compose rendering
(`nginx -t` and a short run against a stub upstream), the Kubernetes manifests (kubernetes-validate, offline
schemas), the Prometheus configuration and alerts (promtool) and the Grafana dashboard. nginx and promtool
are external binaries: without them these tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from handlers.health import READY_TIMEOUT_S
from server.app import MAX_HEADER_BYTES, MAX_URL_BYTES, PARSER_LIMIT_BYTES, STOP_DEADLINE_S
from server.errors import HTTP_STATUS, ErrorCode
from server.websession import MAX_COOKIE_CHARS
from tests.conftest import require_tool as conftest_require_tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX_DIR = DEPLOY / "nginx"
K8S_DIR = DEPLOY / "k8s"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# The oldest Kubernetes minor the manifests promise to work on; kubernetes-validate ships its schemas.
K8S_VERSION = "1.31.0"
COMPOSE_UPSTREAMS = ("app1:8080", "app2:8080", "app3:8080")
# The compose rendering includes the realip directives that real-ip.sh writes from SMARTEDU_TRUSTED_PROXIES.
COMPOSE_REAL_IP_INCLUDE = "/etc/nginx/smartedu/real-ip.conf"
REAL_IP_SCRIPT = NGINX_DIR / "real-ip.sh"
APP_REPLICAS = ("app1", "app2", "app3")
DRAIN_SECONDS = 20

def exposed_metric_names() -> frozenset[str]:
    """Every series name a replica's /metrics can show, from the app's real registry (labelled series too,
    before they have a child)."""
    from server.metrics import Metrics

    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names: set[str] = set()
    for family in Metrics("static-test").registry.collect():
        names.update(f"{family.name}{suffix}" for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return frozenset(names)


APP_METRICS = exposed_metric_names()
# Series the alerts may use besides a replica's own: Prometheus' scrape health.
ALERT_EXTRA_METRICS = frozenset({"up"})


# --------------------------------------------------------------------------------------------- helpers


def require_tool(name: str) -> str:
    """Path of an external tool (venv first, then PATH); missing: fail when CI=true, otherwise skip."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    return conftest_require_tool(found, f"{name} (apt-get install -y nginx prometheus provides nginx and promtool)")


def run_tool(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smartedu_nginx_render", NGINX_DIR / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module through sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


RENDER = load_render_module()


def interpolated_default(value: str) -> str:
    """Resolve compose's `${VAR:-default}` to its default (for pinned-tag checks)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def duration_seconds(value: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"unparsed duration {value!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def nginx_block(config: str, header: str) -> str:
    """The body of the first block whose opening line starts with `header` (braces balanced)."""
    start = config.index(header)
    opening = config.index("{", start)
    depth = 0
    for index in range(opening, len(config)):
        if config[index] == "{":
            depth += 1
        elif config[index] == "}":
            depth -= 1
            if depth == 0:
                return config[opening + 1 : index]
    raise AssertionError(f"unbalanced block {header!r}")


def directives(config: str) -> list[str]:
    """Directive lines of an NGINX config, comments stripped."""
    lines = (line.split("#", 1)[0].strip() for line in config.splitlines())
    return [line for line in lines if line]


_PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "inf",
        "nan",
    }
)


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            continue
        if word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


# ---------------------------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def is_one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart") == "no"


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"nginx", *APP_REPLICAS, "migrate", "postgres", "redis", "prometheus", "grafana"}


def test_compose_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = interpolated_default(service.get("image", ""))
        assert ":" in image, f"{name}: image {image!r} has no tag"
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and "latest" not in tag, f"{name}: image {image!r} is not pinned"
        assert re.match(r"^v?\d+\.\d+(\.\d+)?", tag), f"{name}: tag {tag!r} is not an exact version"
    assert services["postgres"]["image"].startswith("postgres:16.")
    assert services["redis"]["image"].startswith("redis:7.")


def test_compose_app_replicas_share_the_built_image(services: dict[str, dict[str, Any]]) -> None:
    images = {services[name]["image"] for name in (*APP_REPLICAS, "migrate")}
    assert len(images) == 1
    for name in (*APP_REPLICAS, "migrate"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
    assert services["migrate"]["command"] == ["smartedu", "migrate"]


def test_compose_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if is_one_shot(service):
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck lacks {key}"
    for name in APP_REPLICAS:
        assert any("/health" in part for part in services[name]["healthcheck"]["test"])


def test_compose_depends_on_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for target, spec in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_completed_successfully":
                assert is_one_shot(services[target]), f"{name} waits for {target} to complete but it restarts"
            else:
                assert condition == "service_healthy", f"{name} -> {target}: {condition}"
                assert "healthcheck" in services[target], f"{target} has no healthcheck to wait for"
    expected = {
        "migrate": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    for name in APP_REPLICAS:
        assert {k: v["condition"] for k, v in services[name]["depends_on"].items()} == expected
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert set(services["nginx"]["depends_on"]) == set(APP_REPLICAS)


def test_compose_ports(services: dict[str, dict[str, Any]]) -> None:
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert published["nginx"] == ["${SMARTEDU_HTTP_PORT:-8080}:80"]
    for name in ("prometheus", "grafana"):
        assert published[name] and all(str(p).startswith("127.0.0.1:") for p in published[name]), name
    for name in (*APP_REPLICAS, "migrate", "postgres", "redis"):
        assert not published[name], f"{name} must not publish ports"
    for name in APP_REPLICAS:
        assert set(services[name]["expose"]) == {"8080", "9100"}


def test_compose_volumes(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    named = set(compose["volumes"])
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "redisdata:/data" in services["redis"]["volumes"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
                assert volume.endswith(":ro"), f"{name}: bind mount {volume} must be read-only"
            else:
                assert source in named, f"{name} uses undeclared volume {source}"
    assert services["nginx"]["volumes"] == [
        "./deploy/nginx/nginx.conf:/etc/nginx/nginx.conf:ro",
        "./deploy/nginx/real-ip.sh:/docker-entrypoint.d/40-smartedu-real-ip.sh:ro",
        "./static:/srv/static:ro",
    ]


def test_compose_nginx_gets_its_trusted_proxies(services: dict[str, dict[str, Any]]) -> None:
    # The official image runs executable *.sh files in /docker-entrypoint.d/ before NGINX starts; the
    # script writes the file the compose rendering includes, from the variable compose passes on.
    assert os.access(REAL_IP_SCRIPT, os.X_OK), "real-ip.sh must be executable (the image skips it otherwise)"
    script = REAL_IP_SCRIPT.read_text(encoding="utf-8")
    assert f"SMARTEDU_REAL_IP_CONF:-{COMPOSE_REAL_IP_INCLUDE}}}" in script
    assert services["nginx"]["environment"]["SMARTEDU_TRUSTED_PROXIES"] == "${SMARTEDU_TRUSTED_PROXIES:-}"


def test_compose_resource_limits_and_restart(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0, name
        assert re.match(r"^\d+[MG]$", limits["memory"]), name
        expected = "no" if name == "migrate" else "unless-stopped"
        assert service["restart"] == expected, name


def test_compose_app_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_REPLICAS:
        service = services[name]
        env = service["environment"]
        assert env["SMARTEDU_REPLICA_ID"] == name
        assert env["SMARTEDU_METRICS_PORT"] == "9100"
        assert int(env["SMARTEDU_DRAIN_SECONDS"]) == DRAIN_SECONDS
        assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://") and "@redis:6379" in env["REDIS_URL"]
        # Docker sends SIGKILL after stop_grace_period; the drain and the bounded stop after it must finish first.
        assert duration_seconds(service["stop_grace_period"]) > DRAIN_SECONDS + STOP_DEADLINE_S
        assert service["read_only"] is True and "/tmp" in service["tmpfs"]
        assert service["cap_drop"] == ["ALL"]


def test_compose_secrets_come_from_env_file(services: dict[str, dict[str, Any]]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for secret in (
        "POSTGRES_PASSWORD",
        "REDIS_PASSWORD",
        "SMARTEDU_SESSION_KEY",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        assert f"${{{secret}:?" in text, f"{secret} must be required from .env"
    # Either a secret or a public key verifies tokens: compose requires neither, the app one of them.
    for either in ("SMARTEDU_JWT_SECRET", "SMARTEDU_JWT_PUBLIC_KEY"):
        assert services["app1"]["environment"][either] == f"${{{either}:-}}"
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(encoding="utf-8"), re.M))
    referenced = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", text))
    passed_through = {key for key, value in services["app1"]["environment"].items() if value is None}
    missing = (referenced | passed_through) - documented
    assert not missing, f"not documented in .env.example: {sorted(missing)}"


# Documented SMARTEDU_* variables that are not the app's settings.
COMPOSE_ONLY_VARIABLES = {
    "SMARTEDU_VERSION": "the tag of the image compose builds",
    "SMARTEDU_HTTP_PORT": "the host port NGINX publishes",
    "SMARTEDU_TRUSTED_PROXIES": "read by the nginx container (deploy/nginx/real-ip.sh)",
}
# The app reads its settings in these modules.
SETTINGS_SOURCES = (ROOT / "server" / "settings.py", ROOT / "ai" / "config.py")
REQUIRED_DOTENV = {
    "POSTGRES_PASSWORD": "0" * 64,
    "REDIS_PASSWORD": "1" * 64,
    "SMARTEDU_SESSION_KEY": "A" * 43 + "=",
    "GRAFANA_ADMIN_PASSWORD": "2" * 64,
}
PUBLIC_KEY = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"


def compose_value(value: Any, dotenv: dict[str, str]) -> str:
    """Compose's interpolation of one value for the forms this file uses: ${VAR}, ${VAR:-d}, ${VAR:?err}."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        current = dotenv.get(name, "")
        if operator == ":?" and not current:
            raise LookupError(f"compose refuses to start: {name}: {argument}")
        return current or (argument if operator == ":-" else "")

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", substitute, str(value))


def container_environment(service: dict[str, Any], dotenv: dict[str, str]) -> dict[str, str]:
    """What a container's environment would be for this .env (a key without value: passed when set)."""
    result = {}
    for key, value in service["environment"].items():
        if value is None:
            if key in dotenv:
                result[key] = dotenv[key]
        else:
            result[key] = compose_value(value, dotenv)
    return result


def dockerfile_env() -> set[str]:
    envs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "ENV")
    return set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", envs))


def test_every_documented_variable_reaches_the_app(services: dict[str, dict[str, Any]]) -> None:
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8") + ENV_EXAMPLE.read_text(encoding="utf-8")
    documented = set(re.findall(r"\bSMARTEDU_[A-Z0-9_]*[A-Z0-9]\b", text))
    read = "\n".join(path.read_text(encoding="utf-8") for path in SETTINGS_SOURCES)
    passed = set(services["app1"]["environment"]) | dockerfile_env()
    compose_text = COMPOSE_FILE.read_text(encoding="utf-8")
    for name in sorted(documented - COMPOSE_ONLY_VARIABLES.keys()):
        assert f'"{name}"' in read, f"{name} is documented, but the app never reads it"
        assert name in passed, f"{name} is documented, but compose does not pass it to the replicas"
    for name in COMPOSE_ONLY_VARIABLES:
        assert f"${{{name}:-" in compose_text, name
    for name in services["app1"]["environment"]:
        if name.startswith("SMARTEDU_"):
            assert f'"{name}"' in read, f"compose passes {name}, which the app never reads"


def test_compose_empty_optional_variables_keep_the_app_defaults(services: dict[str, dict[str, Any]]) -> None:
    from ai.config import AIConfig
    from server.settings import Settings

    env = container_environment(services["app1"], {**REQUIRED_DOTENV, "SMARTEDU_JWT_SECRET": "3" * 64})
    assert "" in env.values()
    unset = {key: value for key, value in env.items() if value != ""}
    assert Settings.from_env(env) == Settings.from_env(unset)
    assert AIConfig.from_env(env) == AIConfig.from_env(unset)
    assert Settings.from_env(env).redis_prefix == Settings().redis_prefix


def test_compose_runs_the_app_with_a_public_key_and_its_public_url(services: dict[str, dict[str, Any]]) -> None:
    from server.settings import Settings

    dotenv = {
        **REQUIRED_DOTENV,
        "SMARTEDU_JWT_PUBLIC_KEY": PUBLIC_KEY,
        "SMARTEDU_JWT_ALGORITHM": "ES256",
        "SMARTEDU_PUBLIC_URL": "https://chat.example.edu",
        "SMARTEDU_USER_DAILY_TOKENS": "5000",
        "SMARTEDU_TENANT_DAILY_TOKENS": "0",
    }
    for name in (*APP_REPLICAS, "migrate"):
        settings = Settings.from_env(container_environment(services[name], dotenv))
        settings.require_auth()
        assert settings.jwt_secret is None and settings.jwt_public_key == PUBLIC_KEY, name
        assert settings.jwt_algorithm == "ES256"
        assert settings.public_url == "https://chat.example.edu"
        assert (settings.user_daily_tokens, settings.tenant_daily_tokens) == (5000, 0)
    with pytest.raises(LookupError, match="SMARTEDU_SESSION_KEY"):
        container_environment(services["app1"], {k: v for k, v in dotenv.items() if k != "SMARTEDU_SESSION_KEY"})


def test_env_example_has_only_placeholders() -> None:
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(encoding="utf-8"), re.M))
    for key, value in values.items():
        if re.search(r"PASSWORD|SECRET|_KEY$", key):
            assert value == "CHANGE-ME", f"{key} must be the CHANGE-ME placeholder"


# ----------------------------------------------------------------------------------------------- nginx


def test_compose_nginx_conf_is_the_template_rendering() -> None:
    rendered = RENDER.render(RENDER.NginxOptions(upstreams=COMPOSE_UPSTREAMS, real_ip_include=COMPOSE_REAL_IP_INCLUDE))
    assert (NGINX_DIR / "nginx.conf").read_text(encoding="utf-8") == rendered, (
        "deploy/nginx/nginx.conf is stale; regenerate it with "
        "python deploy/nginx/render.py --upstream app1:8080 --upstream app2:8080 --upstream app3:8080 "
        f"--real-ip-include {COMPOSE_REAL_IP_INCLUDE} --output deploy/nginx/nginx.conf"
    )


def test_render_cli_writes_the_same_text(tmp_path: Path) -> None:
    output = tmp_path / "nginx.conf"
    args = [arg for upstream in COMPOSE_UPSTREAMS for arg in ("--upstream", upstream)]
    assert RENDER.main([*args, "--real-ip-include", COMPOSE_REAL_IP_INCLUDE, "--output", str(output)]) == 0
    assert output.read_text(encoding="utf-8") == (NGINX_DIR / "nginx.conf").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "changes",
    [
        {"upstreams": ("app1:8080; evil",)},
        {"upstreams": ()},
        {"upstreams": ("app1",)},
        {"listen": "80 default_server"},
        {"static_root": "relative/static"},
        {"static_root": "/srv/static;\n include /etc/passwd"},
        {"pid": "/tmp/$pid"},
        {"ws_burst": 0},
        {"trusted_proxies": ("lb.example",)},
        {"trusted_proxies": ("10.0.0.1/8",)},
        {"trusted_proxies": ("10.0.0.0/8; include /etc/passwd",)},
        {"real_ip_include": "relative/real-ip.conf"},
        {"trusted_proxies": ("10.0.0.0/8",), "real_ip_include": "/etc/nginx/smartedu/real-ip.conf"},
    ],
)
def test_render_rejects_unsafe_values(changes: dict[str, Any]) -> None:
    options = {"upstreams": ("127.0.0.1:9001",), **changes}
    with pytest.raises(RENDER.RenderError):
        RENDER.render(RENDER.NginxOptions(**options))


def test_render_trusted_proxies() -> None:
    options = RENDER.NginxOptions(upstreams=("127.0.0.1:9001",), trusted_proxies=("10.0.0.0/8", "2001:db8::/32"))
    http = directives(nginx_block(RENDER.render(options), "http {"))
    assert [line for line in http if line.startswith("real_ip") or line.startswith("set_real_ip")] == [
        "set_real_ip_from 10.0.0.0/8;",
        "set_real_ip_from 2001:db8::/32;",
        "real_ip_header X-Forwarded-For;",
        "real_ip_recursive on;",
    ]
    assert directives(nginx_block(RENDER.render(options), "geo $realip_remote_addr $smartedu_trusted_peer")) == [
        "default 0;", "10.0.0.0/8 1;", "2001:db8::/32 1;"
    ]
    untrusted = RENDER.render(RENDER.NginxOptions(upstreams=("127.0.0.1:9001",)))
    assert not any("real_ip" in line or line.startswith("include") for line in directives(untrusted))
    assert directives(nginx_block(untrusted, "geo $realip_remote_addr $smartedu_trusted_peer")) == ["default 0;"]


def run_real_ip_script(output: Path, proxies: str | None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SMARTEDU_REAL_IP_CONF": str(output)}
    if proxies is not None:
        env["SMARTEDU_TRUSTED_PROXIES"] = proxies
    return subprocess.run(
        ["sh", str(REAL_IP_SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=False
    )


def test_real_ip_script_writes_what_render_renders(tmp_path: Path) -> None:
    output = tmp_path / "conf" / "real-ip.conf"
    result = run_real_ip_script(output, "10.0.0.0/8, 2001:db8::/32 192.0.2.7")
    assert result.returncode == 0, result.stderr
    expected = directives("\n".join(RENDER.real_ip_directives(("10.0.0.0/8", "2001:db8::/32", "192.0.2.7"))))
    assert directives(output.read_text(encoding="utf-8")) == expected

    for unset in (None, "", " , "):
        result = run_real_ip_script(output, unset)
        assert result.returncode == 0, result.stderr
        # No realip directives; the peer is never trusted.
        assert directives(output.read_text(encoding="utf-8")) == [
            "geo $realip_remote_addr $smartedu_trusted_peer {", "default 0;", "}"
        ], unset

    bad = tmp_path / "bad" / "real-ip.conf"
    for value in ("10.0.0.0/8;include /etc/passwd", "lb.example", "*"):
        result = run_real_ip_script(bad, value)
        assert result.returncode != 0 and "SMARTEDU_TRUSTED_PROXIES" in result.stderr, value
        assert list(bad.parent.iterdir()) == [], value


def test_nginx_config_content() -> None:
    config = (NGINX_DIR / "nginx.conf").read_text(encoding="utf-8")
    lines = directives(config)
    upstream = directives(nginx_block(config, "upstream smartedu_app"))
    assert upstream[0] == "ip_hash;"
    assert [line for line in upstream if line.startswith("server ")] == [
        f"server {u} max_fails=3 fail_timeout=10s;" for u in COMPOSE_UPSTREAMS
    ]
    assert "listen 80;" in lines
    assert f"include {COMPOSE_REAL_IP_INCLUDE};" in lines
    assert not any(line.startswith(("daemon", "user ")) for line in lines)
    assert "map $http_upgrade $smartedu_connection {" in lines
    for header in (
        "Host $smartedu_host",
        "X-Forwarded-Host $smartedu_host",
        "Upgrade $http_upgrade",
        "Connection $smartedu_connection",
        "X-Real-IP $remote_addr",
        "X-Forwarded-For $smartedu_forwarded_for",
        "X-Forwarded-Proto",
        "X-Request-ID $smartedu_request_id",
    ):
        assert any(line.startswith(f"proxy_set_header {header}") for line in lines), header
    assert 'add_header X-Content-Type-Options "nosniff" always;' in lines
    assert any(line.startswith("add_header Referrer-Policy") for line in lines)
    lowered = "\n".join(lines).lower()
    assert "x-frame-options" not in lowered.replace("proxy_hide_header x-frame-options", "")
    assert "frame-ancestors" not in lowered

    ws = directives(nginx_block(config, "location = /ws"))
    assert "proxy_buffering off;" in ws
    assert "proxy_read_timeout 1h;" in ws and "proxy_send_timeout 1h;" in ws
    assert any(line.startswith("limit_conn smartedu_ws_conn ") for line in ws)
    assert any(line.startswith("limit_req zone=smartedu_ws_req ") for line in ws)
    # proxy_set_header inside a location would discard the server-level forwarding headers.
    assert not any(line.startswith("proxy_set_header") for line in ws)

    assert directives(nginx_block(config, "location = /metrics")) == ["return 404;"]
    static = directives(nginx_block(config, "location ^~ /static/"))
    assert "alias /srv/static/;" in static and any(line.startswith("expires ") for line in static)
    # add_header in a location would drop the server-level security headers there.
    assert not any(line.startswith("add_header") for line in static)
    assert "proxy_pass http://smartedu_app;" in directives(nginx_block(config, "location / "))


def nginx_error_bodies(config: str) -> dict[str, dict[str, Any]]:
    """The JSON error NGINX sends for each status (`default` included), from the template's map."""
    bodies = {}
    for line in directives(nginx_block(config, "map $status $smartedu_error_body")):
        status, _, quoted = line.rstrip(";").partition(" ")
        assert quoted.startswith("'") and quoted.endswith("'"), line
        bodies[status] = json.loads(quoted[1:-1])
    return bodies


def test_nginx_errors_speak_the_api_json_and_its_limits_match_the_app() -> None:
    config = (NGINX_DIR / "nginx.conf").read_text(encoding="utf-8")
    lines = directives(config)
    # Whatever fits NGINX's header buffers fits the app's parser, so the app answers its own 414/431.
    assert f"large_client_header_buffers 4 {PARSER_LIMIT_BYTES // 1024}k;" in lines
    # Room for the app's response headers with a session cookie as large as it sets (not on /ws, whose
    # sockets would each hold the larger buffer).
    (buffer,) = [line for line in directives(nginx_block(config, "location / ")) if line.startswith("proxy_buffer_")]
    assert int(buffer.removeprefix("proxy_buffer_size ").removesuffix("k;")) * 1024 >= 2 * MAX_COOKIE_CHARS
    assert not any(line.startswith("proxy_buffer_size") for line in directives(nginx_block(config, "location = /ws")))
    # The app's own errors (their messages, retry_after, CORS headers) must reach the client as they are.
    assert not any(line.startswith("proxy_intercept_errors") for line in lines)

    bodies = nginx_error_bodies(config)
    codes = {code.value for code in ErrorCode}
    for status, body in bodies.items():
        assert set(body) == {"error"} and body["error"]["code"] in codes and body["error"]["message"], status
    assert bodies["431"]["error"]["code"] == bodies["414"]["error"]["code"] == "too_large"
    assert f"{MAX_HEADER_BYTES} bytes" in bodies["431"]["error"]["message"]
    assert f"{MAX_URL_BYTES} bytes" in bodies["414"]["error"]["message"]
    assert bodies["429"]["error"]["code"] == "rate_limited" and HTTP_STATUS[ErrorCode.RATE_LIMITED] == 429

    pages = [line for line in lines if line.startswith("error_page ")]
    assert pages == [
        "error_page 400 403 404 405 413 414 429 500 502 503 504 /_smartedu/error;",
        "error_page 494 =431 /_smartedu/error;",
    ]
    # 494 (NGINX's "request header too large") is sent as 431, the app's status for a header over its limit.
    sent = set(pages[0].split()[1:-1]) | {"431"}
    assert sent == set(bodies) - {"default"}, "every status sent to /_smartedu/error has its own body"
    page = directives(nginx_block(config, "location = /_smartedu/error"))
    assert page == ["internal;", "default_type application/json;", "return 200 $smartedu_error_body;"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def render_native(prefix: Path, upstreams: tuple[str, ...], static_root: Path, listen_port: int, **extra: Any) -> Path:
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    options = RENDER.NginxOptions(
        upstreams=upstreams,
        listen=f"127.0.0.1:{listen_port}",
        static_root=str(static_root),
        pid=str(prefix / "nginx.pid"),
        error_log=str(prefix / "error.log"),
        access_log=str(prefix / "access.log"),
        temp_dir=str(prefix / "tmp"),
        user=pwd.getpwuid(os.geteuid()).pw_name,
        **extra,
    )
    config = prefix / "nginx.conf"
    config.write_text(RENDER.render(options), encoding="utf-8")
    return config


def test_nginx_accepts_rendered_config(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    config = render_native(tmp_path, ("127.0.0.1:9001", "127.0.0.1:9002"), ROOT / "static", free_port())
    result = run_tool(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(config), "-e", str(tmp_path / "error.log"), "-g", "daemon off;"]
    )
    assert result.returncode == 0, result.stderr
    # No warnings either (a MIME type listed twice, a directive in the wrong place).
    assert "[warn]" not in result.stderr, result.stderr


class _EchoHandler(BaseHTTPRequestHandler):
    """Stub replica: answers every GET with the path and headers it received, and its own port."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.seen.append({"path": self.path, **headers})
        upstream = self.server.server_address[1]
        body = json.dumps({"path": self.path, "headers": headers, "upstream": upstream}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> Reply:
    connection = HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


@dataclass
class StubbedNginx:
    """A native NGINX from the template in front of stub replicas that echo what they received."""

    port: int
    seen: list[dict[str, str]]
    prefix: Path

    def access_log(self) -> list[dict[str, Any]]:
        lines = (self.prefix / "access.log").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


@contextlib.contextmanager
def stubbed_nginx(tmp_path: Path, replicas: int = 1, **extra: Any) -> Iterator[StubbedNginx]:
    nginx = require_tool("nginx")
    seen: list[dict[str, str]] = []
    handler = type("Handler", (_EchoHandler,), {"seen": seen})
    with contextlib.ExitStack() as stack:
        upstreams = []
        for _ in range(replicas):
            upstream = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            upstream.daemon_threads = True
            thread = threading.Thread(target=upstream.serve_forever, daemon=True)
            thread.start()
            stack.callback(thread.join, 5)
            stack.callback(upstream.server_close)
            stack.callback(upstream.shutdown)
            upstreams.append(f"127.0.0.1:{upstream.server_address[1]}")
        static_root = tmp_path / "static"
        static_root.mkdir(exist_ok=True)
        (static_root / "probe.css").write_text("body { color: #222; }\n", encoding="utf-8")
        port = free_port()
        prefix = tmp_path / "nginx"
        config = render_native(prefix, tuple(upstreams), static_root, port, **extra)
        process = subprocess.Popen(
            [nginx, "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(_stop, process)
        wait_listening(process, port, prefix / "error.log")
        yield StubbedNginx(port, seen, prefix)


def wait_listening(process: subprocess.Popen[bytes], port: int, error_log: Path) -> None:
    """Return once `process` (an NGINX) accepts connections on `port`."""
    deadline = time.monotonic() + 10
    while True:
        assert process.poll() is None, error_log.read_text(encoding="utf-8") if error_log.exists() else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def running_nginx(tmp_path: Path) -> Iterator[tuple[int, list[dict[str, str]], Path]]:
    with stubbed_nginx(tmp_path, ws_rate_per_second=1, ws_burst=1) as running:
        yield running.port, running.seen, running.prefix


def test_nginx_proxies_serves_static_and_hides_metrics(
    running_nginx: tuple[int, list[dict[str, str]], Path],
) -> None:
    port, seen, _ = running_nginx

    reply = fetch(port, "/health", {"X-Forwarded-For": "203.0.113.9"})
    assert reply.status == 200
    upstream_headers = json.loads(reply.body)["headers"]
    assert upstream_headers["x-real-ip"] == "127.0.0.1"
    assert upstream_headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    # The port stays in Host: the app's same-origin check compares it with the Origin's.
    assert upstream_headers["host"] == upstream_headers["x-forwarded-host"] == f"127.0.0.1:{port}"
    assert upstream_headers["x-forwarded-proto"] == "http"
    # Without a trusted proxy a client cannot claim https (the scheme the app would be told it was reached by).
    faked = fetch(port, "/health", {"X-Forwarded-Proto": "https"})
    assert json.loads(faked.body)["headers"]["x-forwarded-proto"] == "http"
    assert re.fullmatch(r"[0-9a-f]{32}", upstream_headers["x-request-id"])
    assert "upgrade" not in upstream_headers and "connection" not in upstream_headers
    assert reply.headers["x-request-id"] == upstream_headers["x-request-id"]
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert "x-frame-options" not in reply.headers

    kept = fetch(port, "/api/ping", {"X-Request-ID": "client-req-12345"})
    assert json.loads(kept.body)["headers"]["x-request-id"] == "client-req-12345"

    ws = fetch(port, "/ws?v=1", {"Upgrade": "websocket", "Connection": "Upgrade"})
    ws_headers = json.loads(ws.body)["headers"]
    assert ws_headers["upgrade"] == "websocket" and ws_headers["connection"] == "upgrade"

    before = len(seen)
    for path in ("/metrics", "/metrics/", "/metrics/extra"):
        hidden = fetch(port, path)
        assert hidden.status == 404, path
        assert json.loads(hidden.body) == {"error": {"code": "not_found", "message": "not found"}}
        assert hidden.headers["x-request-id"] and hidden.headers["x-content-type-options"] == "nosniff"
    assert len(seen) == before, "/metrics reached the app"

    static = fetch(port, "/static/probe.css")
    assert static.status == 200 and static.body == b"body { color: #222; }\n"
    assert static.headers["content-type"] == "text/css; charset=utf-8"
    assert static.headers["cache-control"] == "max-age=3600"
    assert "etag" in static.headers and static.headers["x-content-type-options"] == "nosniff"
    assert fetch(port, "/static/missing.js").status == 404
    assert len(seen) == before, "/static/ reached the app"


def test_nginx_rate_limits_websocket_handshakes(running_nginx: tuple[int, list[dict[str, str]], Path]) -> None:
    port, _, _ = running_nginx
    replies = [fetch(port, "/ws") for _ in range(4)]
    assert replies[0].status == 200
    limited = [reply for reply in replies if reply.status == 429]
    assert limited, [reply.status for reply in replies]
    assert limited[0].headers["content-type"] == "application/json"
    assert json.loads(limited[0].body)["error"]["code"] == "rate_limited"


def test_nginx_keys_clients_by_forwarded_address_from_a_trusted_proxy(tmp_path: Path) -> None:
    # The test client connects from 127.0.0.1, which stands for the load balancer here.
    with stubbed_nginx(
        tmp_path, replicas=2, trusted_proxies=("127.0.0.1",), ws_rate_per_second=1, ws_burst=1
    ) as nginx:
        # The client address is the last one no trusted proxy added: a client cannot pick its own by
        # sending X-Forwarded-For itself (198.51.100.7 here).
        reply = fetch(nginx.port, "/health", {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"})
        upstream_headers = json.loads(reply.body)["headers"]
        assert upstream_headers["x-real-ip"] == "203.0.113.9"
        assert upstream_headers["x-forwarded-for"] == "198.51.100.7, 203.0.113.9, 127.0.0.1"

        # The handshake limit counts per client, not for the balancer as a whole.
        limited = [fetch(nginx.port, "/ws", {"X-Forwarded-For": "203.0.113.9"}).status for _ in range(4)]
        assert 429 in limited, limited
        assert fetch(nginx.port, "/ws", {"X-Forwarded-For": "198.51.100.20"}).status == 200

        # ip_hash spreads clients over the replicas instead of sending the balancer's traffic to one.
        replicas = {
            json.loads(fetch(nginx.port, "/health", {"X-Forwarded-For": f"10.{i}.0.1"}).body)["upstream"]
            for i in range(8)
        }
        assert len(replicas) == 2, replicas
        # A TLS-terminating balancer says which scheme the client used.
        for scheme in ("https", "http"):
            reply = fetch(nginx.port, "/health", {"X-Forwarded-Proto": scheme})
            assert json.loads(reply.body)["headers"]["x-forwarded-proto"] == scheme
    # Read once NGINX has stopped: it writes a log line after the response has gone out.
    health = [entry for entry in nginx.access_log() if entry["uri"] == "/health"]
    assert health[0]["remote_addr"] == "203.0.113.9" and health[0]["peer_addr"] == "127.0.0.1"


@pytest.mark.parametrize(("trusted", "client"), [("127.0.0.0/8", "203.0.113.9"), ("10.0.0.0/8", "127.0.0.1")])
def test_nginx_container_trusts_only_smartedu_trusted_proxies(tmp_path: Path, trusted: str, client: str) -> None:
    """The compose path: real-ip.sh writes the file that the rendering includes."""
    include = tmp_path / "smartedu" / "real-ip.conf"
    result = run_real_ip_script(include, trusted)
    assert result.returncode == 0, result.stderr
    with stubbed_nginx(tmp_path, real_ip_include=str(include)) as nginx:
        reply = fetch(nginx.port, "/health", {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
        headers = json.loads(reply.body)["headers"]
        assert headers["x-real-ip"] == client
        # X-Forwarded-Proto counts only from a trusted proxy: the test client (127.0.0.1) is one in the first case.
        assert headers["x-forwarded-proto"] == ("https" if client != "127.0.0.1" else "http")
    assert [entry["remote_addr"] for entry in nginx.access_log()] == [client]


# -------------------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint")
    result = run_tool([hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) == 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.12\.\d+-slim-bookworm AS \w+", stage), stage
    assert len({stage.split()[0] for stage in stages}) == 1  # wheels built on the runtime's own Python
    final_start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    final = instructions[final_start:]
    final_text = "\n".join(f"{keyword} {args}" for keyword, args in final)
    assert "apt-get" not in final_text and "gcc" not in final_text
    assert "--mount=type=bind,from=builder,source=/wheels" in final_text
    assert "--no-index" in final_text and "pip uninstall" in final_text
    users = [args for keyword, args in final if keyword == "USER"]
    assert users and not users[-1].startswith(("0", "root")), users
    envs = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "SMARTEDU_STATIC_DIR=/app/static" in envs
    assert ("COPY", "static/ /app/static/") in final
    assert ("EXPOSE", "8080 9100") in final
    assert ("STOPSIGNAL", "SIGTERM") in final
    healthcheck = next(args for keyword, args in final if keyword == "HEALTHCHECK")
    assert "urllib.request" in healthcheck and "/health" in healthcheck and "curl" not in healthcheck
    assert final[-1] == ("CMD", '["smartedu", "serve", "--host", "0.0.0.0", "--port", "8080"]')


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "tests", ".smartedu"} <= patterns
    for needed in ("static", "server", "handlers", "storage", "ai", "setup.cfg", "pyproject.toml"):
        assert needed not in patterns, needed


# ------------------------------------------------------------------------------------------- Kubernetes


def kustomize_build() -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/k8s` would emit for this simple layout: namespace and images applied."""
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    images = {image["name"]: image for image in kustomization.get("images", [])}
    documents: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((K8S_DIR / resource).read_text(encoding="utf-8")):
            if document is None:
                continue
            if document["kind"] != "Namespace":
                document["metadata"]["namespace"] = kustomization["namespace"]
            for container in pod_containers(document):
                name, _, _ = container["image"].partition(":")
                if name in images:
                    container["image"] = f"{images[name]['newName']}:{images[name]['newTag']}"
            documents.append(document)
    return documents


def pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    if document["kind"] in ("Deployment", "Job"):
        spec: dict[str, Any] = document["spec"]["template"]["spec"]
        return spec
    return None


def pod_containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(document)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    documents = kustomize_build()
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert len(by_key) == len(documents), "duplicate kind/name"
    return by_key


def test_k8s_version_is_shipped() -> None:
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()


def test_k8s_manifests_validate() -> None:
    documents = kustomize_build()
    files = sorted(p.name for p in K8S_DIR.glob("*.yaml"))
    listed = load_yaml(K8S_DIR / "kustomization.yaml")["resources"]
    assert sorted([*listed, "kustomization.yaml", "secret.example.yaml"]) == files
    for path in [K8S_DIR / "secret.example.yaml"]:
        documents.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    for document in documents:
        try:
            kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{document['kind']}/{document['metadata']['name']}: {exc.message}")
    kinds = {d["kind"] for d in documents}
    assert {
        "Deployment",
        "Service",
        "Ingress",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "Job",
        "Secret",
    } <= kinds


def test_k8s_secret_example_is_a_placeholder_template() -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    assert "secret.example.yaml" not in kustomization["resources"]
    secret = load_yaml(K8S_DIR / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "smartedu-secrets"
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        assert "CHANGE-ME" in value, f"{key} must hold a CHANGE-ME placeholder"
    assert {"DATABASE_URL", "REDIS_URL", "SMARTEDU_JWT_SECRET"} <= set(secret["stringData"])


def test_k8s_images_are_pinned(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    for document in manifests.values():
        for container in pod_containers(document):
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), image


def test_k8s_deployment(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = manifests[("Deployment", "smartedu")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # A dependency that does not answer must give the 503, not a probe timeout (a failure all the same,
    # but one the kubelet logs as the probe's, with no word of which dependency).
    assert container["readinessProbe"]["timeoutSeconds"] > READY_TIMEOUT_S
    assert container["readinessProbe"]["timeoutSeconds"] < container["readinessProbe"]["periodSeconds"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9100}

    config = manifests[("ConfigMap", "smartedu-config")]["data"]
    assert int(config["SMARTEDU_DRAIN_SECONDS"]) == DRAIN_SECONDS
    # The migration Job migrates; replicas (possibly with a data-only database role) only check.
    assert config["SMARTEDU_MIGRATE_ON_START"] == "false"
    # Behind the TLS Ingress the app sees http: LTI's redirect_uri must come from the public URL.
    ingress = manifests[("Ingress", "smartedu")]["spec"]
    assert config["SMARTEDU_PUBLIC_URL"] == f"https://{ingress['rules'][0]['host']}"
    assert ingress["rules"][0]["host"] in ingress["tls"][0]["hosts"]
    assert config["SMARTEDU_METRICS_PORT"] == "9100"
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # preStop, then the drain, then a margin, all before SIGKILL.
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + DRAIN_SECONDS + STOP_DEADLINE_S

    for resource in ("cpu", "memory"):
        assert resource in container["resources"]["requests"] and resource in container["resources"]["limits"]
    pod_security = spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    env_from = {next(iter(ref)): next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert env_from == {"configMapRef": "smartedu-config", "secretRef": "smartedu-secrets"}
    replica_env = next(e for e in container["env"] if e["name"] == "SMARTEDU_REPLICA_ID")
    assert replica_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert spec["serviceAccountName"] in {name for kind, name in manifests if kind == "ServiceAccount"}


def test_deploy_doc_states_the_configured_grace_periods(
    services: dict[str, dict[str, Any]], manifests: dict[tuple[str, str], dict[str, Any]]
) -> None:
    text = " ".join((ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").split())
    grace = manifests[("Deployment", "smartedu")]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert f"`terminationGracePeriodSeconds: {grace}`" in text
    for name in APP_REPLICAS:
        assert f"`stop_grace_period: {services[name]['stop_grace_period']}`" in text
    stated = {int(n) for n in re.findall(r"`stop_grace_period: (\d+)s`", text)}
    assert stated == {int(duration_seconds(services[name]["stop_grace_period"])) for name in APP_REPLICAS}
    assert f"bounded at {STOP_DEADLINE_S:g} s" in text


def test_k8s_migration_job(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    job = manifests[("Job", "smartedu-migrate")]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["smartedu", "migrate"]
    assert spec["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_k8s_service_ingress_hpa_pdb_wiring(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod_labels = manifests[("Deployment", "smartedu")]["spec"]["template"]["metadata"]["labels"]
    service = manifests[("Service", "smartedu")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}

    ingress = manifests[("Ingress", "smartedu")]
    annotations = ingress["metadata"]["annotations"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert annotations["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) >= 3600
    assert not any("snippet" in key for key in annotations), "snippets are disabled in ingress-nginx by default"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "smartedu" and backend["port"]["name"] in service_ports

    hpa = manifests[("HorizontalPodAutoscaler", "smartedu")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "smartedu"}
    # CPU only by default: a metric the HPA cannot fetch (no custom-metrics adapter) stops all scale-down.
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 2

    pdb = manifests[("PodDisruptionBudget", "smartedu")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_ingress_limits_and_error_bodies_match_the_compose_nginx(
    manifests: dict[tuple[str, str], dict[str, Any]], services: dict[str, dict[str, Any]]
) -> None:
    template = (NGINX_DIR / "nginx.conf").read_text(encoding="utf-8")
    lines = directives(template)
    annotations = manifests[("Ingress", "smartedu")]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert f"client_max_body_size {annotations[prefix + 'proxy-body-size']};" in lines
    assert f"client_body_buffer_size {annotations[prefix + 'client-body-buffer-size']};" in lines
    buffer = f"proxy_buffer_size {annotations[prefix + 'proxy-buffer-size']};"
    assert buffer in directives(nginx_block(template, "location / "))

    # Intercepted codes replace the app's own answer with that code, so only codes the app never sends.
    intercepted = {int(code) for code in annotations[prefix + "custom-http-errors"].split(",")}
    assert intercepted == {502, 504} and not intercepted & set(HTTP_STATUS.values())
    backend = manifests[("Service", annotations[prefix + "default-backend"])]
    deployment = manifests[("Deployment", "smartedu-errors")]
    pod = deployment["spec"]["template"]
    assert backend["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not backend["spec"]["selector"].items() <= manifests[("Service", "smartedu")]["spec"]["selector"].items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == services["nginx"]["image"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    policy = manifests[("NetworkPolicy", "smartedu-errors")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [rule["from"] for rule in policy["ingress"]] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    ]
    assert policy["egress"] == []

    # The same bodies as NGINX in compose; without X-Code (no pod ready) the 503 one.
    config = manifests[("ConfigMap", "smartedu-errors")]["data"]["nginx.conf"]
    compose = nginx_error_bodies(template)
    ingress_bodies = {
        status: json.loads(body.strip("'"))
        for status, _, body in (
            line.rstrip(";").partition(" ") for line in directives(nginx_block(config, "map $http_x_code"))
        )
    }
    assert ingress_bodies == {"default": compose["503"], **{str(code): compose[str(code)] for code in intercepted}}


def test_k8s_error_backend_answers_json_for_ingress_nginx(
    manifests: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    nginx = require_tool("nginx")
    port = free_port()
    config = manifests[("ConfigMap", "smartedu-errors")]["data"]["nginx.conf"]
    native = tmp_path / "nginx.conf"
    native.write_text(
        config.replace("/tmp/", f"{tmp_path}/").replace("listen 8080;", f"listen 127.0.0.1:{port};"), encoding="utf-8"
    )
    process = subprocess.Popen(
        [nginx, "-c", str(native), "-e", str(tmp_path / "error.log"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(process, port, tmp_path / "error.log")
        # What ingress-nginx sends for an intercepted error, and a request that came because no pod is ready.
        for headers, status, code in (
            ({"X-Code": "502", "X-Format": "text/html"}, 502, "busy"),
            ({"X-Code": "504"}, 504, "busy"),
            ({}, 503, "busy"),
        ):
            reply = fetch(port, "/api/conversations", headers)
            assert reply.status == status, headers
            assert reply.headers["content-type"] == "application/json"
            assert json.loads(reply.body)["error"]["code"] == code
    finally:
        _stop(process)


def test_k8s_connections_metric_is_an_opt_in_component(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    component = load_yaml(K8S_DIR / "connections-metric" / "kustomization.yaml")
    assert component["kind"] == "Component"
    assert "components" not in load_yaml(K8S_DIR / "kustomization.yaml"), "needs an adapter: opt-in only"
    hpa = manifests[("HorizontalPodAutoscaler", "smartedu")]
    (patch,) = component["patches"]
    assert patch["target"] == {
        "group": "autoscaling",
        "version": hpa["apiVersion"].split("/")[1],
        "kind": hpa["kind"],
        "name": hpa["metadata"]["name"],
    }
    # What kustomize does with the JSON patch: append the metric.
    (operation,) = yaml.safe_load(patch["patch"])
    assert (operation["op"], operation["path"]) == ("add", "/spec/metrics/-")
    enabled = json.loads(json.dumps(hpa))
    enabled["spec"]["metrics"].append(operation["value"])
    kubernetes_validate.validate(enabled, K8S_VERSION, strict=True)
    metric = operation["value"]["pods"]["metric"]["name"]
    assert metric in APP_METRICS
    # The adapter rule in docs/deploy.md serves that metric.
    assert f'name: {{matches: "{metric}", as: "{metric}"}}' in (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")


def test_k8s_network_policies(manifests: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod_labels = manifests[("Deployment", "smartedu")]["spec"]["template"]["metadata"]["labels"]
    policy = manifests[("NetworkPolicy", "smartedu")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    sources = {
        rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]: [
            p["port"] for p in rule["ports"]
        ]
        for rule in policy["ingress"]
    }
    assert sources == {"ingress-nginx": ["http"], "monitoring": ["metrics"]}
    egress_ports = sorted({(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]})
    assert egress_ports == [(53, "TCP"), (53, "UDP"), (443, "TCP"), (5432, "TCP"), (6379, "TCP")]

    job_labels = manifests[("Job", "smartedu-migrate")]["spec"]["template"]["metadata"]["labels"]
    migrate = manifests[("NetworkPolicy", "smartedu-migrate")]["spec"]
    assert migrate["podSelector"]["matchLabels"].items() <= job_labels.items()
    assert migrate["ingress"] == []
    assert not (policy["podSelector"]["matchLabels"].items() <= job_labels.items())


# ------------------------------------------------------------------------------------------- Prometheus


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = require_tool("promtool")
    rules = run_tool([promtool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert config.returncode == 0, config.stdout + config.stderr


def test_prometheus_scrapes_every_replica() -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "smartedu")
    targets = {tuple(group["targets"]): group["labels"]["replica"] for group in job["static_configs"]}
    assert targets == {(f"{name}:9100",): name for name in APP_REPLICAS}
    assert config["rule_files"] == ["alerts.yml"]


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alerts_cover_the_runbook_and_use_known_metrics() -> None:
    rules = alert_rules()
    for name in (
        "SmartEduTurnFailureRateHigh",
        "SmartEduAITimeToFirstTokenSlow",
        "SmartEduAICircuitOpen",
        "SmartEduAIUnavailable",
        "SmartEduAIMisconfigured",
        "SmartEduAIUnknownFinishReason",
        "SmartEduPostgresDown",
        "SmartEduRedisDown",
        "SmartEduReplicaRestarting",
        "SmartEduReplicaDown",
        "SmartEduConnectionsDropped",
        "SmartEduAnswerCommitsRetried",
        "SmartEduHellosBusy",
    ):
        assert name in rules, name
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        unknown = promql_metric_names(rule["expr"]) - APP_METRICS - ALERT_EXTRA_METRICS
        assert not unknown, f"{name} uses metrics no replica exposes: {unknown}"


def test_replicas_expose_what_the_restart_alert_counts() -> None:
    # A custom registry has no process collector unless the app adds one: without it the alert never fires.
    assert "process_start_time_seconds" in promql_metric_names(alert_rules()["SmartEduReplicaRestarting"]["expr"])
    assert "process_start_time_seconds" in APP_METRICS
    assert {"smartedu_ws_connections", "smartedu_turns_total", "smartedu_ai_ttft_seconds_bucket"} <= APP_METRICS


def expected_annotations(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, str]:
    def fill(text: str) -> str:
        filled = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        assert "{{" not in filled, f"{rule['alert']}: pick an alert without $value for this test"
        return filled

    return {key: fill(value) for key, value in rule["annotations"].items()}


def test_alerts_fire_as_intended(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    rules = alert_rules()

    def expect(alert: str, *label_sets: dict[str, str]) -> dict[str, Any]:
        rule = rules[alert]
        alerts = []
        for extra in label_sets:
            labels = {**rule["labels"], **extra}
            alerts.append({"exp_labels": labels, "exp_annotations": expected_annotations(rule, labels)})
        return {"alertname": alert, "exp_alerts": alerts}

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        matchers = ",".join(f'{key}="{value}"' for key, value in labels.items())
        return {"series": f"{name}{{{matchers}}}", "values": values}

    test_file = {
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    series("smartedu_dependency_up", "1 1 0x10", dependency="postgres", replica="app1"),
                    series("smartedu_dependency_up", "1x12", dependency="postgres", replica="app2"),
                    series("smartedu_dependency_up", "1x12", dependency="redis", replica="app1"),
                    series("smartedu_ai_circuit_open", "0 1x11", replica="app1"),
                    series("smartedu_ai_circuit_open", "0 1x11", replica="app2"),
                    series("up", "1 0x11", job="smartedu", replica="app3", instance="app3:9100"),
                    series("smartedu_turns_total", "0+100x12", status="complete", replica="app1"),
                    series("smartedu_turns_total", "0+1x12", status="failed", replica="app1"),
                    # A refused key fails every answer from minute 3; rate limits are an outage, not settings,
                    # and a 400 about one conversation (too long for the model) is that conversation's.
                    series("smartedu_ai_errors_total", "0 0 0 1+20x9", kind="auth", replica="app1"),
                    series("smartedu_ai_errors_total", "0+5x12", kind="rate_limited", replica="app1"),
                    series("smartedu_ai_errors_total", "0+1x12", kind="invalid_request", replica="app1"),
                    # app2's provider ends two answers at minute 5 with a reason this release does not know.
                    series("smartedu_ai_unknown_finish_reasons_total", "0x4 2x8", replica="app2"),
                    # app1's commits are retried from minute 2 on; app2 rode through one restart at minute 1.
                    series("smartedu_answer_commit_retries_total", "0 0 0+4x10", replica="app1"),
                    series("smartedu_answer_commit_retries_total", "0 3x11", replica="app2"),
                    # A quarter of app1's hellos are busy from minute 1; app2's class start, 2 minutes of it.
                    series("smartedu_hellos_total", "0+30x12", outcome="ok", replica="app1"),
                    series("smartedu_hellos_total", "0+10x12", outcome="busy", replica="app1"),
                    series("smartedu_hellos_total", "0+30x12", outcome="ok", replica="app2"),
                    series("smartedu_hellos_total", "0 50 100 100x9", outcome="busy", replica="app2"),
                ],
                "alert_rule_test": [
                    expect("SmartEduPostgresDown", {"replica": "app1"}) | {"eval_time": "8m"},
                    expect("SmartEduRedisDown") | {"eval_time": "8m"},
                    expect("SmartEduAICircuitOpen", {"replica": "app1"}, {"replica": "app2"}) | {"eval_time": "8m"},
                    expect("SmartEduAIUnavailable", {}) | {"eval_time": "8m"},
                    expect("SmartEduAIMisconfigured") | {"eval_time": "2m"},
                    expect("SmartEduAIMisconfigured", {"kind": "auth"}) | {"eval_time": "4m"},
                    expect("SmartEduAIUnknownFinishReason") | {"eval_time": "4m"},
                    expect("SmartEduAIUnknownFinishReason", {"replica": "app2"}) | {"eval_time": "6m"},
                    expect("SmartEduReplicaDown", {"job": "smartedu", "replica": "app3", "instance": "app3:9100"})
                    | {"eval_time": "8m"},
                    # 1% failures stays below the 5% threshold.
                    expect("SmartEduTurnFailureRateHigh") | {"eval_time": "11m"},
                    expect("SmartEduAnswerCommitsRetried") | {"eval_time": "6m"},
                    expect("SmartEduAnswerCommitsRetried", {"replica": "app1"}) | {"eval_time": "8m"},
                    expect("SmartEduHellosBusy") | {"eval_time": "10m"},
                    expect("SmartEduHellosBusy", {"replica": "app1"}) | {"eval_time": "12m"},
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test_file, sort_keys=False), encoding="utf-8")
    result = run_tool([promtool, "test", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- Grafana


def dashboard() -> dict[str, Any]:
    data = json.loads((GRAFANA_DIR / "dashboards" / "smartedu.json").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def dashboard_panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in data["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_grafana_provisioning_matches_compose(services: dict[str, dict[str, Any]]) -> None:
    datasources = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    (source,) = datasources
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    (provider,) = providers
    mounts = dict(
        volume.rsplit(":", 1)[0].split(":", 1) for volume in services["grafana"]["volumes"] if volume.startswith("./")
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"

    uids = {
        target["datasource"]["uid"] for panel in dashboard_panels(dashboard()) for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}


def test_grafana_dashboard_queries_use_known_metrics() -> None:
    data = dashboard()
    assert data["uid"] and data["title"]
    panels = dashboard_panels(data)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    expressions = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert expressions
    for expr in expressions:
        unknown = promql_metric_names(expr) - APP_METRICS
        assert not unknown, f"unknown metrics {unknown} in {expr}"
    for variable in data["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])
        assert match and match.group(1) in APP_METRICS
    joined = "\n".join(expressions)
    for needed in (
        "smartedu_ws_connections",
        "smartedu_turns_total",
        "smartedu_ai_ttft_seconds_bucket",
        "smartedu_tokens_streamed_total",
        "smartedu_ai_errors_total",
        'smartedu_hellos_total{replica=~"$replica"}',  # `busy` hellos: a pool too small for a class start
        "smartedu_answer_commit_retries_total",
        "smartedu_slow_sockets_closed_total",
        "by (replica)",
        "histogram_quantile(0.95",
    ):
        assert needed in joined, needed
