"""docs/kcat.md: every shell block is a recipe (`# recipe: NAME` on its first line); each is run here as
written, with the first block's variables pointing at topics of this test, against the broker and a
running switchyard, and its effect is checked."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, BOOTSTRAP, REPO, Stack

DOC = REPO / "docs" / "kcat.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"# recipe: ([\w-]+)\n")
# The variables of the `env` recipe, and the isolated topic each one is set to.
VARIABLES = {"REQUESTS": "REQUESTS", "DEPLOYMENTS": "DEPLOYMENTS", "HISTORY": "HISTORY",
             "DECISIONS": "DECISIONS", "DLQ": "DEAD_LETTER"}


def recipes():
    found = {}
    for language, body in BLOCK.findall(DOC.read_text()):
        marker = MARKER.match(body)
        if language == "sh":
            assert marker, f"a sh block of {DOC.name} without a '# recipe:' marker (so untested):\n{body}"
            assert marker.group(1) not in found, f"recipe {marker.group(1)} twice"
            found[marker.group(1)] = body[marker.end():]
    return found


def test_every_shell_block_is_a_recipe_and_every_recipe_is_run_here():
    names = set(recipes())
    assert names == {"env", "list", "describe", "write-deployment", "deployments", "history", "follow-decisions",
                     "watch-decisions", "decode-decisions", "produce-garbage", "dead-letters", "delete-deployment"}
    # The env block sets exactly the variables the others use (and the test sets).
    env = recipes()["env"]
    assert set(re.findall(r"^(\w+)=", env, re.M)) == {"BOOTSTRAP", *VARIABLES}
    used = set()
    for name, body in recipes().items():
        if name != "env":
            used |= set(re.findall(r"\$\{?([A-Z_]+)", body))
    assert used <= {"BOOTSTRAP", *VARIABLES}, used


@pytest.fixture(scope="module")
def kcat():
    path = shutil.which("kcat")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("kcat is not installed (scripts/test_platform.sh installs it: apt-get install -y kcat)")
        pytest.skip("kcat is not installed")
    return path


class Recipes:
    """Runs the doc's recipes for one stack: `bash` with the env recipe first, from the repository's root,
    with `switchyard` (the binary under test) and `python3` (the venv's, which has fastavro) on PATH."""

    def __init__(self, stack, tmp):
        self.stack = stack
        self.book = recipes()
        bin_dir = Path(tmp) / "bin"
        bin_dir.mkdir()
        (bin_dir / "switchyard").symlink_to(BIN)
        self.env = dict(stack.env)
        self.env.update({var: stack.topic(key) for var, key in VARIABLES.items()})
        self.env["BOOTSTRAP"] = BOOTSTRAP
        self.env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])

    def script(self, name):
        return "set -euo pipefail\n" + self.book["env"] + self.book[name]

    def run(self, name, timeout=60):
        out = subprocess.run(["bash", "-c", self.script(name)], cwd=REPO, env=self.env, capture_output=True,
                             timeout=timeout)
        assert out.returncode == 0, f"recipe {name} exited {out.returncode}: {out.stderr.decode(errors='replace')}"
        return out.stdout.decode(errors="replace")

    def start(self, name):
        log = open(self.stack.dir / f"recipe-{name}.out", "wb")
        return subprocess.Popen(["bash", "-c", self.script(name)], cwd=REPO, env=self.env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def output(self, name):
        return (self.stack.dir / f"recipe-{name}.out").read_text(errors="replace")


def headers(text):
    """kcat's %h: name=value pairs separated by commas (values may hold spaces and commas)."""
    return dict(pair.split("=", 1) for pair in re.split(r",(?=[\w.]+=)", text))


def wait_for(what, check, timeout=60, every=1.0):
    deadline = time.time() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@pytest.fixture(scope="module")
def book(broker, kcat, tmp_path_factory):
    stack = Stack("kcat")
    try:
        stack.cli("create-topics")
        stack.run_service()
        for model in ("fraud-v1", "fraud-v2"):
            stack.spawn(model, ["demo-model", "--model", model, "--latency-ms", "5"])
        yield Recipes(stack, tmp_path_factory.mktemp("kcat"))
    finally:
        stack.stop_all()


def test_list_and_describe(book):
    out = book.run("list")
    assert f'topic "{book.stack.topic("DECISIONS")}" with 4 partitions' in out, out
    out = book.run("describe")
    assert book.stack.topic("DEPLOYMENTS") in out and "cleanup.policy=compact" in out, out


def test_a_deployment_written_by_hand_takes_effect_and_decisions_follow_it(book):
    stack = book.stack
    follower = book.start("follow-decisions")
    try:
        time.sleep(3)  # kcat is at the end of every partition before anything is decided
        book.run("write-deployment")
        status = wait_for("the deployment in force", lambda: (lambda s: s if "version 1" in s else None)(
            stack.cli("status", "fraud", check=False).stdout))
        assert "strategy blue_green" in status and "fraud-v2" in status, status

        count = 60
        stack.cli("loadgen", "--deployment", "fraud", "--rate", "60", "--count", str(count), "--users", "30",
                  "--run-id", "kcat-")
        lines = wait_for(f"{count} decisions in the follower's output",
                         lambda: (lambda ls: ls if len(ls) >= count else None)(
                             [line for line in book.output("follow-decisions").splitlines() if line.strip()]))
    finally:
        os.killpg(follower.pid, signal.SIGTERM)
        follower.wait(10)
    assert len(lines) == count, lines
    for line in lines:
        timestamp, user, _ = line.split(" ", 2)
        assert timestamp.isdigit() and user.startswith("user-"), line
        assert headers(line.split(" ", 2)[2]) == {"model": "fraud-v2", "cohort": "candidate", "status": "OK", "deployment": "fraud"}, line

    # The record on the topic, the history entry with who and why, and the decisions decoded two ways.
    records = [line.split("\t", 1) for line in book.run("deployments").splitlines() if line]
    assert [key for key, _ in records] == ["fraud"] and '"version":1' in records[0][1]
    history = wait_for("the history entry", lambda: book.run("history").strip())
    assert history.startswith("fraud\t") and "operator:alice" in history and "switch to fraud-v2 by hand" in history, history

    watched = book.run("watch-decisions", timeout=30)
    assert re.search(r"fraud\s+fraud-v2\s+candidate\s+OK\s+60\b", watched), watched

    decoded = [line.split(" ") for line in book.run("decode-decisions").splitlines()]
    assert len(decoded) == count
    assert len({d[0] for d in decoded}) == count and all(d[0].startswith("kcat-") for d in decoded), decoded[:3]
    assert {tuple(d[2:6]) for d in decoded} == {("fraud", "fraud-v2", "candidate", "OK")}
    assert all(re.fullmatch(r"0\.\d{4}", d[6]) for d in decoded), decoded[:3]

    # Delete it: the instance drops it (version 0 in its metrics) and status no longer lists it.
    book.run("delete-deployment")
    wait_for("the deletion", lambda: 'switchyard_config_version{deployment="fraud"} 0' in stack.metrics())
    assert "fraud" not in stack.cli("status").stdout.replace(stack.prefix, "")


def test_garbage_is_dead_lettered_with_its_reason(book):
    book.run("produce-garbage")

    def undecodable():
        for line in book.run("dead-letters").splitlines():
            if line.startswith("key=user-1 "):
                return headers(line[len("key=user-1 "):])
        return None

    h = wait_for("the dead letter", undecodable, timeout=30)
    assert h["dlq.kind"] == "undecodable", h
    assert h["dlq.reason"], h
    assert h["dlq.topic"] == book.stack.topic("REQUESTS") and h["dlq.partition"].isdigit() and h["dlq.offset"].isdigit(), h
