"""Cluster definitions and job entry points, checked offline against the real package.

- infra/aws/cluster.yaml passes Ray's own cluster-config preparation and schema validation;
- infra/k8s/ manifests are ray.io/v1 with autoscaler v2, bounded worker groups and one image
  (built from infra/k8s/Dockerfile, tagged with the package version) everywhere;
- every entry point a manifest or runtime_env names resolves to a real ``sslmm`` subcommand
  and only uses options that subcommand has: a command that does not exist fails here;
- every cluster requires Ray's token (RAY_AUTH_MODE=token, the token from SSM or a Kubernetes
  Secret, never a literal), the AWS dashboard listens on loopback only, and a NetworkPolicy
  admits only each KubeRay cluster's own pods to it.
"""

from __future__ import annotations

import copy
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import typer.main
import yaml

from sslmm_ray.cli import app

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest brings tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "infra" / "aws" / "cluster.yaml"
K8S = ROOT / "infra" / "k8s"
JOBS = ROOT / "jobs"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

# ---------------------------------------------------------------------- command resolution


def cli_commands() -> dict[str, object]:
    """The ``sslmm`` subcommands, as ``sslmm --help`` lists them (click command objects)."""
    return dict(typer.main.get_command(app).commands)


def cli_options(subcommand: str) -> set[str]:
    command = cli_commands()[subcommand]
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}


def job_subcommand(script: Path) -> str:
    """The subcommand a jobs/*.py entry point prepends (its ``run("...")`` call)."""
    match = re.search(r'\brun\("([a-z-]+)"\)', script.read_text())
    assert match, f"{script} does not call run('<subcommand>')"
    return match.group(1)


def image_app_dir() -> str:
    """Where infra/k8s/Dockerfile copies the repository inside the image."""
    match = re.search(r"^COPY\s+(?:--\S+\s+)*\.\s+(\S+)\s*$", dockerfile(), re.M)
    assert match, "infra/k8s/Dockerfile does not COPY the repository"
    return match.group(1).rstrip("/")


def resolve_entrypoint(entrypoint: str) -> tuple[str, list[str]]:
    """-> (sslmm subcommand, its arguments); raises AssertionError for anything that would not
    run: an unknown program, a missing jobs/ script, an unknown subcommand or option."""
    argv = shlex.split(entrypoint)
    assert argv, "empty entrypoint"
    if argv[0] == "sslmm":
        assert len(argv) > 1, "sslmm without a subcommand"
        subcommand, args = argv[1], argv[2:]
    elif Path(argv[0]).name in {"python", "python3"}:
        assert len(argv) > 1 and argv[1].endswith(".py"), f"not a script: {entrypoint}"
        script = argv[1]
        app_dir = image_app_dir() + "/"
        if script.startswith(app_dir):  # a path inside the image -> the same file here
            script = script[len(app_dir):]
        path = ROOT / script
        assert path.is_file() and path.parent == JOBS, f"no such entry point: {argv[1]}"
        subcommand, args = job_subcommand(path), argv[2:]
    else:
        raise AssertionError(f"unknown program {argv[0]!r} in entrypoint {entrypoint!r}")
    assert subcommand in cli_commands(), (
        f"`sslmm {subcommand}` does not exist (sslmm --help lists {sorted(cli_commands())})"
    )
    known = cli_options(subcommand)
    for arg in args:
        if arg.startswith("--"):
            opt = arg.split("=", 1)[0]
            assert opt in known, f"`sslmm {subcommand}` has no option {opt}"
    return subcommand, args


def test_resolver_rejects_what_does_not_exist():
    resolve_entrypoint("python jobs/finetune.py --data x --run-dir y --label-ratio 0.5")
    resolve_entrypoint("sslmm evaluate --data x --checkpoint y")
    for bad in [
        "sslmm no-such-command --data x",
        "python jobs/no_such_job.py --data x",
        "python jobs/finetune.py --data x --no-such-option 1",
        "bash -c 'sslmm finetune'",
        "python sslmm_ray/cli.py finetune",
    ]:
        with pytest.raises(AssertionError):
            resolve_entrypoint(bad)


def test_sslmm_help_lists_the_subcommands():
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in cli_commands():
        assert name in result.output


# ---------------------------------------------------------------------- jobs/


ENTRY_POINTS = {"pretrain.py": "pretrain", "finetune.py": "finetune", "sweep.py": "tune",
                "evaluate.py": "evaluate"}


@pytest.mark.parametrize("script,subcommand", sorted(ENTRY_POINTS.items()))
def test_job_entry_points_wrap_their_subcommand(script, subcommand):
    path = JOBS / script
    assert job_subcommand(path) == subcommand
    resolve_entrypoint(f"python jobs/{script} --help")


def test_job_entry_point_runs_the_cli():
    """`python jobs/finetune.py --help` is `sslmm finetune --help`; a usage error exits 2."""
    python = ROOT / ".venv" / "bin" / "python"
    ok = subprocess.run([python, JOBS / "finetune.py", "--help"], capture_output=True,
                        text=True, timeout=180, cwd="/")
    assert ok.returncode == 0, ok.stderr
    assert "--label-ratio" in ok.stdout and "sslmm finetune" in ok.stdout
    bad = subprocess.run([python, JOBS / "finetune.py", "--no-such-option"], capture_output=True,
                         text=True, timeout=180, cwd="/")
    assert bad.returncode == 2
    assert "No such option: --no-such-option" in bad.stderr
    assert "Traceback" not in bad.stderr


RUNTIME_ENVS = sorted(JOBS.glob("runtime_env*.yaml"))


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=lambda p: p.name)
def test_runtime_envs_are_valid_and_hold_no_secrets(path):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(path.read_text())
    assert set(env) <= {"working_dir", "excludes", "pip", "env_vars", "py_modules"}
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert env["env_vars"]["SSLMM_AUTOSCALING"] == "1"
    assert not {k for k in env["env_vars"] if re.search("SECRET|KEY_ID|TOKEN|PASSWORD", k)}


def test_pip_runtime_env_matches_pyproject():
    env = yaml.safe_load((JOBS / "runtime_env.pip.yaml").read_text())
    deps = [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("ray")]
    assert env["pip"]["packages"] == deps


def test_no_credentials_in_cluster_files():
    pattern = re.compile(r"aws_secret_access_key|aws_access_key_id|AKIA[0-9A-Z]{16}", re.I)
    files = [p for d in ("jobs", "infra") for p in (ROOT / d).rglob("*") if p.is_file()
             and p.suffix in {".yaml", ".yml", ".json", ".py", ""} and p.name != "up.sh"]
    assert files
    for path in files:
        assert not pattern.search(path.read_text(errors="replace")), path


# ---------------------------------------------------------------------- infra/aws


def aws_config() -> dict:
    return yaml.safe_load(AWS.read_text())


def test_aws_cluster_passes_ray_validation():
    """What `ray up` does before it calls AWS: fill the provider defaults, merge the setup
    commands, check docker and per-type bounds, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(aws_config()))
    validate_config(config)
    assert config["provider"]["type"] == "aws"


def test_aws_validation_is_not_vacuous():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = aws_config()
    broken["idle_timeout_minute"] = 5  # typo'd key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
    broken = aws_config()
    broken["available_node_types"]["worker.gpu"]["min_workers"] = 99  # > global max_workers
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


def test_aws_cluster_shape():
    config = aws_config()
    types = config["available_node_types"]
    assert config["idle_timeout_minutes"] > 0
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu, cpu = types["worker.gpu"], types["worker.cpu"]
    for worker in (gpu, cpu):
        assert 0 <= worker["min_workers"] < worker["max_workers"] <= config["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU instance families
    assert cpu["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    # S3 by instance role on every node, never keys.
    for name, node in types.items():
        assert "IamInstanceProfile" in node["node_config"], name
    # Images: Ray's own, at the installed Ray version; the GPU type runs the GPU image.
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"
    assert gpu["docker"]["worker_image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_aws_setup_installs_the_right_torch_then_the_package():
    config = aws_config()
    assert config["file_mounts"] == {"~/sslmm": "."}
    types = config["available_node_types"]
    plans = {
        "head": (config["setup_commands"] + config["head_setup_commands"], "/whl/cpu"),
        "worker.cpu": (types["worker.cpu"]["worker_setup_commands"], "/whl/cpu"),
        "worker.gpu": (types["worker.gpu"]["worker_setup_commands"], "/whl/cu"),
    }
    for name, (commands, index) in plans.items():
        torch_cmd = next(c for c in commands if '"torch==' in c)
        assert index in torch_cmd, f"{name}: torch from the wrong index: {torch_cmd}"
        assert commands.index(torch_cmd) < len(commands) - 1
        assert shlex.split(commands[-1])[-1] == "~/sslmm", f"{name}: package not installed"


# ---------------------------------------------------------------------- infra/k8s


def dockerfile() -> str:
    return (K8S / "Dockerfile").read_text()


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    head_env = {e["name"]: e.get("value") for e in
                spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_enable_autoscaler_v2"] == "1"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    for c in containers(spec):
        assert not c.get("command") and not c.get("args"), "KubeRay generates ray start itself"


def images(spec: dict) -> set[str]:
    return {c["image"] for c in containers(spec)}


def test_raycluster_manifest():
    docs = k8s_docs("raycluster.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "RayCluster"}
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    check_cluster_spec(cluster["spec"])
    account = kinds["ServiceAccount"]["metadata"]["name"]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    assert all(g["template"]["spec"]["serviceAccountName"] == account for g in groups)


def test_rayjob_manifest_runs_the_sweep_on_the_same_image():
    (job,) = k8s_docs("rayjob-sweep.yaml")
    (cluster,) = [d for d in k8s_docs("raycluster.yaml") if d["kind"] == "RayCluster"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    check_cluster_spec(spec["rayClusterSpec"])
    # One image everywhere, tagged with this package's version.
    (image,) = images(cluster["spec"]) | images(spec["rayClusterSpec"])
    assert re.fullmatch(rf"\S+/sslmm-ray:{re.escape(VERSION)}", image), image
    # The runtime env carries no install (the image has it) and no secrets.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}
    # The entry point: the sweep job, resolving to a real subcommand with real options.
    argv = shlex.split(spec["entrypoint"])
    assert argv[1].endswith("/jobs/sweep.py")
    subcommand, _ = resolve_entrypoint(spec["entrypoint"])
    assert subcommand == "tune"


def test_dockerfile_builds_on_ray_and_installs_the_package():
    text = dockerfile()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-gpu"
    runs = " ".join(re.findall(r"^RUN\s+(.+?)(?<!\\)$", text, re.M | re.S))
    assert re.search(r'pip install .*"torch==[\d.]+" --index-url \S+/whl/cu\d+', runs)
    assert f"pip install --no-cache-dir {image_app_dir()}" in runs
    assert "sslmm --help" in runs  # the build fails if the console script does not run
    assert (K8S / "Dockerfile.dockerignore").read_text().count(".venv")


# ---------------------------------------------------------------------- infra/local


@pytest.mark.parametrize("script", ["up.sh", "down.sh"])
def test_local_scripts_are_executable_bash(script):
    path = ROOT / "infra" / "local" / script
    assert path.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", path], check=True, timeout=30)
    text = path.read_text()
    assert "pkill" not in text and "killall" not in text  # only recorded pids


# ---------------------------------------------------------------------- access: token auth, reach
#
# Anyone who reaches the job API runs code with the head's cloud role: every cluster definition
# must require Ray's token (RAY_AUTH_MODE=token; the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
# or ~/.ray/auth_token, in that order) taken from a secret store, and keep the dashboard off the
# network (loopback on AWS, a NetworkPolicy on Kubernetes).

NETPOL = "networkpolicy.yaml"
TOKEN_KEY = "auth_token"  # the Secret key KubeRay's authOptions.secretName requires
JOB_API_PORT = 8265
INSTANCE = "app.kubernetes.io/instance"
JOB_NAME = "batch.kubernetes.io/job-name"  # set by Kubernetes on a Job's pods


def ray_default_token_file() -> str:
    """Ray's own default token path (~/.ray/auth_token), as a path under ``~``."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    return "~/" + str(_get_default_token_path().relative_to(Path.home()))


def check_aws_access(config: dict) -> None:
    region = config["provider"]["region"]
    token_file = ray_default_token_file()
    # Interactive shells in the container (`ray exec ... "ray status"`) are in token mode too.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"], "container env"
    text = yaml.safe_dump(config)
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text), "a literal token in the cluster config"
    # Every node type can run the AWS CLI before Ray starts (setup runs before start commands).
    types = config["available_node_types"]
    setups = {"head": config["setup_commands"] + config["head_setup_commands"],
              **{n: types[n].get("worker_setup_commands", config["worker_setup_commands"])
                 for n in types if n != config["head_node_type"]}}
    for name, commands in setups.items():
        assert any(re.search(r"pip install .*\bawscli\b", c) for c in commands), name
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config[key]
        (start,) = [i for i, c in enumerate(commands) if re.search(r"\bray start\b", c)]
        fetches = [i for i, c in enumerate(commands) if "aws ssm get-parameter" in c]
        assert len(fetches) == 1 and fetches[0] < start, f"{key}: token not fetched before start"
        fetch = commands[fetches[0]]
        assert re.search(rf"--region {re.escape(region)}\b", fetch), fetch
        assert re.search(r"--name /\S+", fetch) and "--with-decryption" in fetch, fetch
        assert "umask 077" in fetch, "the token file must be private"
        # Written where Ray looks by default; an empty fetch must fail the start.
        assert re.search(rf"(?:>|mv \S+) {re.escape(token_file)}$", fetch), fetch
        assert "test -s" in fetch, fetch
        assert re.search(r"\bexport RAY_AUTH_MODE=token;", commands[start]), commands[start]
        hosts = re.findall(r"--dashboard-host[= ](\S+)", commands[start])
        if key == "head_start_ray_commands":
            assert hosts == ["127.0.0.1"], f"dashboard not on loopback: {commands[start]}"
        else:
            assert not hosts  # workers run no dashboard


def test_aws_cluster_requires_the_token_from_ssm_and_keeps_the_dashboard_on_loopback():
    check_aws_access(aws_config())


def test_aws_access_check_is_not_vacuous():
    def broken(edit) -> dict:
        config = aws_config()
        edit(config)
        return config

    def head_start(config: dict) -> list[str]:
        return config["head_start_ray_commands"]

    mutations = {
        "dashboard on all interfaces": lambda c: head_start(c).__setitem__(
            -1, head_start(c)[-1].replace("127.0.0.1", "0.0.0.0")),
        "no token mode": lambda c: head_start(c).__setitem__(
            -1, head_start(c)[-1].replace("export RAY_AUTH_MODE=token;", "")),
        "no fetch": lambda c: head_start(c).pop(1),
        "fetch after start": lambda c: head_start(c).append(head_start(c).pop(1)),
        "literal token": lambda c: c["worker_start_ray_commands"].__setitem__(
            -1, "RAY_AUTH_TOKEN=abc " + c["worker_start_ray_commands"][-1]),
        "token file elsewhere": lambda c: head_start(c).__setitem__(
            1, head_start(c)[1].replace(".new ~/.ray/auth_token", ".new /tmp/token")),
        "no aws cli on a worker type": lambda c: c["available_node_types"]["worker.cpu"][
            "worker_setup_commands"].pop(1),
        "no token mode in the container": lambda c: c["docker"]["run_options"].pop(),
    }
    for name, edit in mutations.items():
        with pytest.raises((AssertionError, ValueError)):
            check_aws_access(broken(edit))
            pytest.fail(f"not caught: {name}")  # pragma: no cover


def check_k8s_token_auth(spec: dict) -> None:
    auth = spec["authOptions"]
    assert auth["mode"] == "token" and not auth.get("enableK8sTokenAuth")
    secret = auth["secretName"]  # our Secret: KubeRay then injects it into its own containers
    for c in containers(spec):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"].get("value") == "token", c["name"]
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, f"{c['name']}: literal token"
        assert token["valueFrom"] == {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}


def cluster_specs() -> dict[str, tuple[dict, str | None]]:
    """name -> (RayCluster spec, RayJob name or None), for every KubeRay definition here."""
    (cluster,) = [d for d in k8s_docs("raycluster.yaml") if d["kind"] == "RayCluster"]
    (job,) = k8s_docs("rayjob-sweep.yaml")
    return {"raycluster.yaml": (cluster["spec"], None),
            "rayjob-sweep.yaml": (job["spec"]["rayClusterSpec"], job["metadata"]["name"])}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-sweep.yaml"])
def test_k8s_clusters_require_the_token_from_a_secret(name):
    spec, _ = cluster_specs()[name]
    check_k8s_token_auth(spec)


def test_k8s_token_check_is_not_vacuous():
    spec, _ = cluster_specs()["raycluster.yaml"]
    literal = copy.deepcopy(spec)
    worker_env = literal["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    for e in worker_env:
        if e["name"] == "RAY_AUTH_TOKEN":
            e.pop("valueFrom")
            e["value"] = "not-a-secret"
    other_secret = copy.deepcopy(spec)
    other_secret["authOptions"]["secretName"] = "some-other-secret"
    no_mode = copy.deepcopy(spec)
    no_mode["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        e for e in no_mode["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] != "RAY_AUTH_MODE"]
    disabled = copy.deepcopy(spec)
    disabled["authOptions"]["mode"] = "disabled"
    for bad in (literal, other_secret, no_mode, disabled):
        with pytest.raises((AssertionError, KeyError)):
            check_k8s_token_auth(bad)


def test_no_secret_objects_in_the_repository():
    """The token Secret is created by the operator of the cluster, never committed."""
    for path in K8S.glob("*.yaml"):
        assert all(d.get("kind") != "Secret" for d in k8s_docs(path.name)), path


def pod_labels(group: dict, node_type: str) -> dict[str, str]:
    """The labels a KubeRay pod of this group gets that matter here (template's + node type)."""
    return {**group["template"].get("metadata", {}).get("labels", {}),
            "ray.io/node-type": node_type}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are used: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_network_policy(policy: dict, spec: dict, job_name: str | None) -> None:
    """The policy selects the cluster's head (and workers) and admits only the cluster's own
    pods; a RayJob's submitter pods may reach the job API and nothing else."""
    head = pod_labels(spec["headGroupSpec"], "head")
    workers = [pod_labels(g, "worker") for g in spec["workerGroupSpecs"]]
    instance = head[INSTANCE]
    assert all(w.get(INSTANCE) == instance for w in workers), "workers outside the policy"
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    pspec = policy["spec"]
    assert pspec["podSelector"].get("matchLabels"), "an empty podSelector selects every pod"
    assert selects(pspec["podSelector"], head), "the policy does not select the head"
    assert all(selects(pspec["podSelector"], w) for w in workers)
    assert "Ingress" in pspec["policyTypes"], "ingress is not restricted"
    assert pspec.get("ingress"), "no ingress rule: nothing could reach the head"
    own = {INSTANCE: instance}
    for rule in pspec["ingress"]:
        assert rule.get("from"), "a rule without 'from' admits every source"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"a peer outside the cluster's pods: {peer}"
            match = peer["podSelector"].get("matchLabels")
            if match == own:
                continue  # the cluster's own pods, on every port Ray uses
            assert job_name and match == {JOB_NAME: job_name}, f"foreign pods admitted: {peer}"
            assert rule.get("ports") == [{"protocol": "TCP", "port": JOB_API_PORT}], rule


def network_policies() -> list[dict]:
    return [d for d in k8s_docs(NETPOL) if d["kind"] == "NetworkPolicy"]


def policy_for(spec: dict) -> dict:
    head = pod_labels(spec["headGroupSpec"], "head")
    found = [p for p in network_policies() if selects(p["spec"]["podSelector"], head)]
    assert len(found) == 1, f"{len(found)} NetworkPolicies select this head"
    return found[0]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-sweep.yaml"])
def test_network_policy_admits_only_the_clusters_own_pods(name):
    spec, job_name = cluster_specs()[name]
    # The dashboard listens on all pod interfaces (the head Service needs it): acceptable only
    # because this policy restricts who reaches it.
    check_network_policy(policy_for(spec), spec, job_name)


def test_clusters_have_distinct_instance_labels():
    """Otherwise one cluster's pods would count as the other's own."""
    labels = [pod_labels(spec["headGroupSpec"], "head")[INSTANCE]
              for spec, _ in cluster_specs().values()]
    assert len(set(labels)) == len(labels)


def test_network_policy_check_is_not_vacuous():
    spec, job_name = cluster_specs()["rayjob-sweep.yaml"]
    good = policy_for(spec)

    def broken(edit) -> dict:
        policy = copy.deepcopy(good)
        edit(policy["spec"])
        return policy

    # The commented operator rule is valid YAML and, once enabled, is not in-cluster traffic.
    text = (K8S / NETPOL).read_text().split("name: sslmm-sweep", 1)[1]
    opt_in = "\n".join(line.replace("# ", "", 1) for line in text.splitlines()
                       if re.match(r"    # [- ]", line))  # YAML lines, not the prose above
    operator_rule = yaml.safe_load(opt_in)
    assert operator_rule[0]["from"][0]["namespaceSelector"]
    assert operator_rule[0]["ports"] == [{"protocol": "TCP", "port": JOB_API_PORT}]
    mutations = [
        lambda s: s["ingress"].extend(operator_rule),
        lambda s: s["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        lambda s: s["ingress"].append({"ports": [{"protocol": "TCP", "port": 8265}]}),
        lambda s: s["ingress"][0]["from"].append({"podSelector": {}}),
        lambda s: s["ingress"][0]["from"][0].update(namespaceSelector={}),
        lambda s: s["ingress"][1].pop("ports"),
        lambda s: s.update(podSelector={"matchLabels": {INSTANCE: "someone-else"}}),
        lambda s: s.update(podSelector={}),
        lambda s: s.update(policyTypes=["Egress"]),
    ]
    for edit in mutations:
        with pytest.raises(AssertionError):
            check_network_policy(broken(edit), spec, job_name)
    with pytest.raises(AssertionError):  # the submitter rule is only for the RayJob's cluster
        check_network_policy(good, spec, None)


def test_local_cluster_requires_the_token_on_loopback():
    text = (ROOT / "infra" / "local" / "up.sh").read_text()
    start = text.index('"$VENV/bin/ray" start --head')
    export = re.search(r"^export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=", text, re.M)
    assert export and export.start() < start, "the head must start in token mode"
    assert re.search(r"^HOST=127\.0\.0\.1$", text, re.M)
    command = text[start:text.index("&\n", start)]
    for flag in ("--node-ip-address", "--dashboard-host"):
        assert f'{flag} "$HOST"' in command, flag
    assert re.search(r"umask 077 && .*token_hex", text), "the token file must be private"
    env_sh = text[text.index('cat > "$STATE/env.sh"'):]
    assert "export RAY_AUTH_MODE=token" in env_sh and "RAY_AUTH_TOKEN_PATH=" in env_sh
