"""``make container-test``: a Docker engine and the images docker-compose.yml names, without a registry.

Our machines reach package registries but no container registry, so the images
that ``Dockerfile`` and ``docker-compose.yml`` start from are built here:

- ``python:3.11-slim``: Debian bookworm (``debootstrap --variant=minbase`` from the
  apt mirror this machine uses) with Debian's Python 3.11 and a venv at /usr/local,
  so that the layout matches the official image (``python`` on the PATH, pip
  installs into /usr/local/lib/python3.11/site-packages);
- the Kafka image: that base, Debian's JRE, the broker jars and kafka-tools from
  Maven Central, and an entrypoint that maps ``KAFKA_*`` variables to server.properties;
- the Prometheus image: that base and Debian's ``prometheus`` package.

They are stand-ins, tagged with the names the compose file uses; each carries a
label with a hash of its recipe, and an image whose label matches is reused.

    python tools/container.py test     # install, start the engine, build, run tests/container_stack.py
    python tools/container.py images   # only build the images (the engine must be running)
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from localkafka import terminate

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "containers"
CACHE = Path(os.environ.get("DATASYNC_KAFKA_CACHE", Path.home() / ".cache" / "datasync")) / "containers"
DOCKER = "/usr/bin/docker"  # Debian's client, whatever else is first on the PATH
LABEL = "org.datasync.recipe"
BASE_TAG = "python:3.11-slim"
# python3-dev: the official python image ships its C headers, which building our C walk needs.
BASE_PACKAGES = ["python3", "python3-venv", "python3-pip", "python3-dev", "ca-certificates"]
APT_PACKAGES = ["docker.io", "docker-compose", "debootstrap", "maven", "openjdk-17-jre-headless"]
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")


class EngineError(Exception):
    """The container engine could not be installed or started."""


def log(message: str) -> None:
    print(f"container: {message}", flush=True)


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the client quietly; a failure shows its output and raises ``EngineError``."""
    done = subprocess.run([DOCKER, *args], text=True, capture_output=True)
    if check and done.returncode != 0:
        print(done.stdout[-4000:] + done.stderr[-4000:], file=sys.stderr)
        raise EngineError(f"docker {args[0]} failed (exit {done.returncode})")
    return done


def ensure_packages() -> None:
    """Install the engine, compose, debootstrap and what the Kafka jars need, once per machine."""
    needed = ["/usr/sbin/dockerd", "/usr/bin/docker-compose", "/usr/sbin/debootstrap", "/usr/bin/mvn", "/usr/bin/java"]
    if all(Path(p).exists() for p in needed):
        return
    log("installing " + " ".join(APT_PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def engine_answers() -> bool:
    return docker("info", check=False).returncode == 0


@contextmanager
def engine(workdir: Path, timeout: float = 60.0) -> Iterator[None]:
    """Use the running engine, or start dockerd for the duration and stop it after."""
    if engine_answers():
        log("using the Docker engine that is already running")
        yield
        return
    had_bridge = Path("/sys/class/net/docker0").exists()
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / "dockerd.log"  # kept after the run, for when the engine did not start
    with open(log_path, "wb") as out:
        # --ip: a port published without an address binds to loopback, never to every interface.
        proc = subprocess.Popen(
            ["/usr/sbin/dockerd", "--ip", "127.0.0.1", "--pidfile", str(workdir / "dockerd.pid")],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not engine_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                lines = log_path.read_text(errors="replace").strip().splitlines() or ["no output"]
                raise EngineError(f"the Docker engine did not start (log {log_path}): {lines[-1]}")
            time.sleep(0.5)
        log(f"started dockerd (pid {proc.pid}, log {log_path})")
        yield
    finally:
        terminate(proc, timeout=60)
        if not had_bridge and shutil.which("ip"):
            subprocess.run(["ip", "link", "delete", "docker0"], check=False, stderr=subprocess.DEVNULL)
        log("stopped dockerd")


def recipe(*parts: str | Path) -> str:
    """A short hash of the strings and files that make an image."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.read_bytes() if isinstance(part, Path) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def current(tag: str, key: str) -> bool:
    fmt = '{{ index .Config.Labels "' + LABEL + '" }}'
    found = docker("image", "inspect", "--format", fmt, tag, check=False)
    return found.returncode == 0 and found.stdout.strip() == key


def apt_mirror() -> tuple[str, str]:
    """The Debian mirror and suite apt uses here, so the base image needs nothing else."""
    sources = [*sorted(Path("/etc/apt").glob("sources.list.d/*.sources")), Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.exists():
            continue
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
            )
            uris, suites = fields.get("URIs", "").split(), fields.get("Suites", "").split()
            if uris and suites and uris[0].rstrip("/").endswith("/debian"):
                return uris[0], suites[0]
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[1].rstrip("/").endswith("/debian"):
                return words[1], words[2]
    raise EngineError("no Debian mirror found in /etc/apt/sources.list*")


def build_base() -> str:
    """``python:3.11-slim`` from debootstrap; the root file system is cached as a tarball."""
    mirror, suite = apt_mirror()
    certs = sorted(EXTRA_CA_DIR.glob("*.crt"))
    key = recipe(mirror, suite, *BASE_PACKAGES, *certs, inspect.getsource(build_base))
    if current(BASE_TAG, key):
        return key
    tarball = CACHE / f"base-{suite}-{key}.tar"
    if not tarball.exists():
        log(f"debootstrap {suite} from {mirror} (a few minutes, once)")
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="datasync-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), suite, rootfs, mirror],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            for cert in certs:  # a TLS-inspecting proxy's CA: pip and apt in the builds need it
                shutil.copy(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
            subprocess.run(["chroot", rootfs, "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["chroot", rootfs, "python3", "-m", "venv", "/usr/local"], check=True)
            subprocess.run(["chroot", rootfs, "apt-get", "clean"], check=True)
            shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
            (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", rootfs, "--numeric-owner", "-cf", partial, "."], check=True)
            for old in CACHE.glob("base-*.tar"):  # of an older recipe
                old.unlink()
            partial.rename(tarball)
    log(f"importing {BASE_TAG}")
    changes = [f"LABEL {LABEL}={key}", "ENV LANG=C.UTF-8", 'CMD ["python3"]']
    docker("import", *(arg for c in changes for arg in ("--change", c)), str(tarball), BASE_TAG)
    return key


def compose_image(service: str) -> str:
    """The image a service of docker-compose.yml names: the stand-in's tag."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return str(compose["services"][service]["image"])


def kafka_jars() -> Path:
    """The broker jars plus kafka-tools (for kafka-topics.sh), from Maven Central."""
    version = (ROOT / "tools/kafka/pom.xml").read_text().split("<kafka.version>")[1].split("<")[0]
    libs = CACHE / f"kafka-{version}-libs"
    if (libs / ".complete").exists():
        return libs
    shutil.rmtree(libs, ignore_errors=True)
    pom = HERE / "kafka" / "pom.xml"
    copy = ["dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={libs}"]
    subprocess.run(
        ["mvn", "-q", "-B", "-Dstyle.color=never", "-f", str(pom), f"-Dkafka.version={version}", *copy], check=True
    )
    (libs / ".complete").touch()
    return libs


def build_standin(name: str, tag: str, base_key: str, extra: dict[str, Path]) -> None:
    """Build ``tools/containers/<name>`` (plus ``extra`` files) as ``tag``, unless it is current."""
    source = HERE / name
    files = sorted(p for p in source.rglob("*") if p.is_file())
    key = recipe(base_key, tag, *files, *(f"{k}={v.name}" for k, v in sorted(extra.items())))
    if current(tag, key):
        return
    log(f"building the stand-in {tag}")
    with tempfile.TemporaryDirectory(prefix=f"datasync-{name}-") as tmp:
        context = Path(tmp)
        shutil.copytree(source, context, dirs_exist_ok=True)
        for target, path in extra.items():
            (shutil.copytree if path.is_dir() else shutil.copy)(path, context / target)
        docker("build", "--quiet", "--network", "host", "--label", f"{LABEL}={key}", "-t", tag, str(context))


def build_images() -> None:
    base_key = build_base()
    build_standin("kafka", compose_image("kafka"), base_key, {"libs": kafka_jars()})
    build_standin("prometheus", compose_image("prometheus"), base_key, {})


def test(pytest_args: list[str]) -> int:
    """Everything ``make container-test`` does; any failure before the tests is one line and exit 1."""
    try:
        ensure_packages()
        with tempfile.TemporaryDirectory(prefix="datasync-engine-") as tmp, engine(Path(tmp)):
            started = time.monotonic()
            build_images()
            log(f"images ready in {time.monotonic() - started:.0f} s")
            tests = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(ROOT / "tests/container_stack.py")]
            code = subprocess.run([*tests, *pytest_args], cwd=ROOT).returncode
            # Images that newer builds replaced; ours all carry the label (datasync:local from the base).
            docker("image", "prune", "--force", "--filter", f"label={LABEL}")
            return code
    except EngineError as e:
        print(f"container-test: {e}", file=sys.stderr)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"container-test: could not set up the container engine or images: {e}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    command = argv[1] if len(argv) > 1 else ""
    if command == "test":
        return test(argv[2:])
    if command == "images":
        build_images()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
