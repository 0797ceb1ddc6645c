"""Deployments as users run them: a real Prefect server (SQLite, 127.0.0.1), `multianimate
deploy` from prefect.yaml, a real process worker, a training run and a generation run
triggered through the API the way the UI triggers them, and a training run started from the
UI itself: headless Chromium (Debian's) fills the train deployment's form and submits it.

The server, the deployments and the worker are shared by the module's tests: their start-up
(about 15 s) is paid once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from data_schemas.job import JobSpec, submit_job
from data_schemas.workspace import Workspace
from preprocess.synthetic import SyntheticSpec, render_clip
from tests.helpers.models import run_config
from tests.helpers.poses import crafted_pose_config, driving_files

pytestmark = [pytest.mark.slow, pytest.mark.server]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, again after a while (a worker ignores the first), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server and the environment of its clients; stopped afterwards."""
    tmp_path = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PYTHONPATH=str(REPO),
    )
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Prefect server did not become healthy"
            time.sleep(0.5)
        yield {"env": env, "url": f"http://127.0.0.1:{port}", "tmp": tmp_path}
    finally:
        stop(proc)


RUN_DEPLOYMENT = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=float(sys.argv[3]))
print(json.dumps({"state": run.state.type.value, "message": run.state.message}))
"""


def run_deployment(server: dict, name: str, parameters: dict, timeout: float = 300) -> dict:
    """Create a flow run of a deployment through the API (what the UI's Run button does) and
    wait for it to end."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_DEPLOYMENT, name, json.dumps(parameters), str(timeout)],
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def deployed(server):
    """`multianimate deploy` against the server, then a process worker on the gpu pool."""
    env = server["env"]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy"], env=env, capture_output=True, text=True, cwd=server["tmp"]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    worker_log = (server["tmp"] / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"],
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield server
    finally:
        stop(worker)


def worker_log_tail(server: dict) -> str:
    return (server["tmp"] / "worker.log").read_text()[-4000:]


def test_deploy_then_train_and_generate_through_a_worker(deployed, train_workspace):
    server = deployed
    listed = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "ls"], env=server["env"], capture_output=True, text=True
    )
    for name in ("preprocess/preprocess", "embed/embed", "train/train", "generate/generate"):
        assert name in listed.stdout, listed.stdout

    config = json.loads(run_config(train_workspace, "from-ui", nproc=1, max_steps=2).model_dump_json())
    result = run_deployment(server, "train/train", {"config": config})
    assert result["state"] == "COMPLETED", (result, worker_log_tail(server))
    assert (Workspace(train_workspace).run("from-ui") / "final" / "adapter.safetensors").is_file()

    ws, inputs = server["tmp"] / "gen-ws", server["tmp"] / "inputs"
    inputs.mkdir()
    poses, masks = driving_files(inputs, SyntheticSpec(width=64, height=64, num_frames=9, num_persons=2, seed=2))
    reference = inputs / "reference.png"
    cv2.imwrite(
        str(reference),
        render_clip(SyntheticSpec(width=64, height=64, num_frames=1, num_persons=2, seed=5)).frames[0][..., ::-1],
    )
    job_id, _ = submit_job(
        ws, JobSpec(reference=reference, poses=poses, masks=masks, steps=2, num_frames=5, height=64, width=64)
    )
    pose_cfg = crafted_pose_config(server["tmp"] / "models", (64, 64))  # the tiny random models find nobody
    result = run_deployment(
        server, "generate/generate", {"workspace": str(ws), "config": {"pose": json.loads(pose_cfg.model_dump_json())}}
    )
    assert result["state"] == "COMPLETED", (result, worker_log_tail(server))
    assert sorted(p.name for p in Workspace(ws).output(job_id).iterdir()) == [
        "job.json",
        "preview.mp4",
        "preview.png",
        "video.mp4",
    ]


FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def chromium(monkeypatch: pytest.MonkeyPatch) -> WebDriver:
    """Debian's headless Chromium and chromedriver; with both paths given (and SE_OFFLINE),
    Selenium Manager never tries a download. Names other than 127.0.0.1 do not resolve: the
    UI's analytics stay home."""
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, saved on failure
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


# React re-renders elements while a page's queries settle: an action is retried whole
RETRIED = (NoSuchElementException, StaleElementReferenceException, ElementClickInterceptedException)


def click(browser: WebDriver, xpath: str) -> None:
    def attempt(b: WebDriver) -> bool:
        element = b.find_element(By.XPATH, xpath)
        if not (element.is_displayed() and element.is_enabled()):
            return False
        b.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)  # clear of the sticky header
        element.click()
        return True

    WebDriverWait(browser, 30, ignored_exceptions=RETRIED).until(attempt, f"no clickable {xpath}")


def fill(browser: WebDriver, label: str, value: object) -> None:
    """Type into the field a form label names: select-all, then type, as a user replaces a
    default (the inputs are React-controlled: setting .value would not reach the form)."""

    def attempt(b: WebDriver) -> bool:
        for_id = b.find_element(By.XPATH, f"//label[normalize-space()='{label}']").get_attribute("for")
        field = b.find_element(By.ID, for_id)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(str(value))
        return field.get_attribute("value") == str(value)

    WebDriverWait(browser, 30, ignored_exceptions=RETRIED).until(attempt, f"no field {label!r} that takes {value!r}")


def submit(browser: WebDriver) -> str:
    """Submit the run form as a user would, and again after an error toast: the server answers
    503 while SQLite is busy (Prefect's Python client retries it, the UI does not). Returns
    the new run's page, which the success toast links to."""
    toast, errors = "//li[@data-sonner-toast]", []

    def read(answer: WebElement) -> tuple[str, str, str | None]:
        links = answer.find_elements(By.XPATH, ".//a[.//button[normalize-space()='View run']]")
        return answer.get_attribute("data-type"), answer.text, links[0].get_attribute("href") if links else None

    def attempt(b: WebDriver) -> str | None:
        # the pointer off the toasts (they stay while it is over them), which must be gone:
        # the next one is the answer, and none covers the button
        ActionChains(b).move_to_element(b.find_element(By.XPATH, "//label[normalize-space()='Run Name']")).perform()
        WebDriverWait(b, 30).until(lambda b: not b.find_elements(By.XPATH, toast))
        click(b, "//button[@type='submit'][normalize-space()='Submit']")
        kind, text, link = WebDriverWait(b, 30, ignored_exceptions=RETRIED).until(
            lambda b: read(b.find_element(By.XPATH, toast))
        )
        if kind == "success" and link:
            return link
        errors.append(text)
        return None

    try:
        return WebDriverWait(browser, 90, ignored_exceptions=RETRIED).until(attempt)
    except TimeoutException as e:
        raise AssertionError(f"the form was not accepted; error toasts: {errors}") from e


def flow_run(server: dict, run_id: str) -> dict:
    with urllib.request.urlopen(f"{server['url']}/api/flow_runs/{run_id}", timeout=10) as r:
        return json.load(r)


def test_train_run_started_from_the_ui_form(deployed, train_workspace, tmp_path, monkeypatch):
    """Deployments -> train -> Run -> Custom run, the config form filled in, Submit: the run
    completes and its weights are written."""
    server, name = deployed, "from-browser"
    # the fields whose defaults are not for a CPU (run_config of tests/helpers/models.py)
    values = {
        "workspace": str(train_workspace),
        "run_name": name,
        "num_frames": 9,
        "height": 48,
        "width": 64,
        "max_steps": 2,
        "nproc": 1,
    }
    browser = chromium(monkeypatch)
    try:
        browser.get(server["url"] + "/")
        click(browser, "//a[normalize-space()='Deployments']")
        click(browser, "//a[normalize-space()='train'][contains(@href, '/deployments/deployment/')]")
        click(browser, "//button[normalize-space()='Run']")
        click(browser, "//*[@role='menuitem'][normalize-space()='Custom run']")
        for field, value in values.items():
            fill(browser, f"{field.replace('_', ' ').title()} (Optional)", value)  # labels: the pydantic titles
        url = submit(browser)
        run_id = url.rstrip("/").rsplit("/", 1)[-1]
        config = flow_run(server, run_id)["parameters"]["config"]
        given = config | config.get("loader", {})  # the clip's shape is the loader section's
        assert {k: given[k] for k in values} == values, config  # before a wait on the wrong run
        # wait through the API on a blank page: on 2 cores the live run page (graph, logs)
        # slows the training down by half
        browser.get("about:blank")
        state = WebDriverWait(browser, 300, poll_frequency=1).until(
            lambda _: (t := flow_run(server, run_id)["state"]["type"]) in FINAL_STATES and t
        )
        browser.get(url)
        assert state == "COMPLETED", state
        badge = (By.XPATH, "//span[normalize-space()='Completed']")  # the run's state, as the page shows it
        WebDriverWait(browser, 30).until(EC.visibility_of_element_located(badge))
    except Exception as e:
        browser.save_screenshot(str(tmp_path / "ui.png"))
        (tmp_path / "ui.html").write_text(browser.page_source)
        (tmp_path / "console.log").write_text("\n".join(str(entry) for entry in browser.get_log("browser")))
        raise AssertionError(
            f"{type(e).__name__}: {e}\nscreenshot and page source: {tmp_path}\nworker log:\n{worker_log_tail(server)}"
        ) from e
    finally:
        browser.quit()
    assert (Workspace(train_workspace).run(name) / "final" / "adapter.safetensors").is_file()
