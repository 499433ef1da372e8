"""The HTTP face against a running ``ainode serve``: the REST API with tokens and roles, the
pictures, the dashboard in a real headless Chromium, and the metrics scraped by a real
Prometheus server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import free_port, stop_process, wait_for_port
from node.results.preview import render_segmentation
from node.synthetic.ct import make_ct_series, phantom_volume
from nodeproc import wait_for, REPO, NodeProcess, write_config

TOKENS = {"viewer": "viewer-token-0123456789", "operator": "operator-token-0123456789",
          "sender": "sender-token-0123456789"}
ARTIFACTS = REPO / "test-artifacts"
SLICES, SIZE = 24, 128



class Site:
    """A node with its HTTP face, a PACS that is down at first, and two studies received."""

    def __init__(self, tmp: Path, models: Path, dcmtk) -> None:
        self.tmp, self.dcmtk = tmp, dcmtk
        tokens = tmp / "tokens"
        tokens.write_text("# role name token\n" + "".join(f"{role} {role}-user {token}\n"
                                                           for role, token in TOKENS.items()))
        tokens.chmod(0o600)
        self.pacs_port, self.http_port = free_port(), free_port()
        port = free_port()
        config = write_config(tmp / "node.toml", {
            "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp / "data")},
            "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 0},
            "inference": {"models_dir": str(models), "providers": ["CPUExecutionProvider"]},
            "delivery": {"max_attempts": 1, "backoff_s": 0.2, "timeout_s": 5},
            "http": {"host": "127.0.0.1", "port": self.http_port, "tokens_file": str(tokens)},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": self.pacs_port}],
            "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": ["pacs"]},
                       {"name": "er", "match": {"Modality": "CT", "CallingAETitle": "ER*"},
                        "models": ["ct-tissue"], "send_to": ["pacs"], "priority": "urgent"}],
        })
        self.node = NodeProcess(config=config, port=port, data_dir=tmp / "data", log=tmp / "node.log").start()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.routine = make_ct_series(tmp / "routine", slices=SLICES, size=SIZE, accession="ROUTINE1")
        self.urgent = make_ct_series(tmp / "urgent", slices=SLICES, size=SIZE, accession="URGENT1",
                                     patient_id="PHANTOM-0002", seed=1)
        self.sent = 0
        for aet, phantom in (("CTSCANNER", self.routine), ("ERSCANNER", self.urgent)):
            dcmtk.run("storescu", "-aet", aet, "-aec", "AINODE", "127.0.0.1", str(port),
                      *[str(f) for f in phantom.files])
            self.sent += len(phantom.files)
        self.pacs: subprocess.Popen | None = None

    def get(self, path: str, role: str | None = "viewer", **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
        return httpx.get(self.url + path, headers=headers, timeout=30, **kw)

    def post(self, path: str, role: str | None = "operator") -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}
        return httpx.post(self.url + path, headers=headers, timeout=60)

    def jobs(self, **query) -> list[dict]:
        return self.get("/api/v1/jobs", params=query).json()["jobs"]

    def start_pacs(self) -> Path:
        folder = self.tmp / "pacs"
        folder.mkdir(exist_ok=True)
        log = self.tmp / "pacs.log"
        self.pacs = subprocess.Popen([self.dcmtk.storescp, "--aetitle", "PACS", "+xa", "-od", str(folder),
                                      str(self.pacs_port)], env=self.dcmtk.env, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_for_port(self.pacs_port, self.pacs, log, 60)
        return folder

    def stop(self) -> None:
        self.node.stop()
        if self.pacs is not None:
            stop_process(self.pacs)


@pytest.fixture(scope="module")
def site(tmp_path_factory, models_dir, dcmtk):
    s = Site(tmp_path_factory.mktemp("web"), models_dir, dcmtk)
    try:
        wait_for(lambda: len(s.jobs(state="done")) == 2, "both jobs done")
        wait_for(lambda: all(d["status"] == "failed" for j in s.jobs() for d in j["deliveries"])
                 and all(j["deliveries"] for j in s.jobs()), "deliveries failed (the PACS is down)")
        yield s
    finally:
        s.stop()


def test_tokens_and_roles(site):
    assert site.get("/api/v1/status", role=None).status_code == 401
    assert httpx.get(site.url + "/api/v1/status", headers={"Authorization": "Bearer wrong-token-0123456789"},
                     timeout=30).status_code == 401
    assert site.get("/api/v1/status", role="viewer").status_code == 200
    assert site.get("/api/v1/status", role="sender").status_code == 403          # STOW only
    assert site.post("/api/v1/reload", role="viewer").status_code == 403
    assert site.post("/api/v1/reload", role=None).status_code == 401
    done = site.post("/api/v1/reload", role="operator")
    assert done.status_code == 200 and done.json()["ok"], done.text
    audit = site.get("/api/v1/audit", params={"action": "reload"}).json()["audit"]
    assert audit and audit[0]["actor"] == "operator:operator-user"
    assert site.get("/openapi.json", role=None).json()["info"]["title"] == "pacs-ai-node"


def test_api_lists_what_the_command_line_lists(site):
    status = site.get("/api/v1/status").json()
    assert status["instances"]["stored"] == site.sent and status["jobs"] == {"done": 2}
    assert status["ready"] == {"listener": True, "database": True, "models": True}
    assert sum(r["instances"] for r in status["ingest_per_minute"]) == site.sent
    urgent = site.jobs(priority="urgent")
    assert len(urgent) == 1 and urgent[0]["accession"] == "URGENT1"
    assert site.jobs(study=site.routine.study_uid)[0]["accession"] == "ROUTINE1"
    assert len(site.jobs(limit=1)) == 1 and site.jobs(limit=1, offset=1)[0]["id"] != site.jobs(limit=1)[0]["id"]
    worklist = site.get("/api/v1/worklist").json()["worklist"]
    assert [w["accession"] for w in worklist] == ["URGENT1", "ROUTINE1"]            # most urgent first
    job = site.get(f"/api/v1/jobs/{urgent[0]['id']}").json()
    assert job["instances"] == SLICES and set(job["summary"]["volumes_ml"]) == {"Body", "Lungs", "Bone"}
    assert job["deliveries"][0]["status"] == "failed"
    cli = json.loads(site.node.cli("jobs", "--json").stdout)
    assert {j["id"] for j in cli} == {j["id"] for j in site.jobs()}                 # the same report
    assert site.get("/api/v1/jobs/99999").status_code == 404
    assert site.get("/api/v1/jobs", params={"limit": 100000}).status_code == 422
    for path in ("/api/v1/deliveries", "/api/v1/notifications", "/api/v1/routes/log"):
        assert site.get(path).status_code == 200, path


def test_the_picture_puts_each_segment_on_its_anatomy(site):
    job = site.jobs(priority="routine")[0]
    response = site.get(f"/api/v1/jobs/{job['id']}/preview.png")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "preview-ct-tissue.png").write_bytes(response.content)
    detail = site.get(f"/api/v1/jobs/{job['id']}").json()
    sources = sorted(Path(site.node.data_dir / "images" / detail["study_uid"] / detail["series_uid"]).glob("*.dcm"))
    seg = next(Path(f) for f in detail["result_files"] if f.endswith("seg.dcm"))
    picture = render_segmentation(sources, seg, "check", detail["summary"]["volumes_ml"])
    image = np.asarray(Image.open(BytesIO(response.content)).convert("RGB")).astype(int)
    below_title = picture.panels[0].y                 # the same picture but for the title
    assert np.array_equal(image[below_title:], np.asarray(Image.open(BytesIO(picture.png)).convert("RGB"))[below_title:])
    _, truth = phantom_volume(SLICES, SIZE)
    blue = np.asarray(picture.colours["Lungs"])
    assert blue[2] - blue[0] > 100                     # the manifest's lung colour is a blue

    def at(panel, y: int, x: int) -> np.ndarray:
        return image[panel.y + int((y + 0.5) * panel.scale_y), panel.x + int((x + 0.5) * panel.scale)]

    checked = 0
    for panel in picture.panels:
        if panel.view != "axial" or not truth["Lungs"][panel.index].any():
            continue
        lungs = truth["Lungs"][panel.index]
        tissue = truth["Body"][panel.index] & ~lungs & ~truth["Bone"][panel.index]
        ys, xs = np.nonzero(lungs)
        for side in (xs < SIZE / 2, xs >= SIZE / 2):           # each lung, at its centre
            y, x = int(np.median(ys[side])), int(np.median(xs[side]))
            assert lungs[y, x]
            pixel = at(panel, y, x)
            assert pixel[2] - pixel[0] > 40, ("lung not blue", panel, pixel)
        ty, tx = np.nonzero(tissue)
        k = np.argmin((ty - ys.mean()) ** 2 + (tx - SIZE / 2) ** 2)   # soft tissue between the lungs
        pixel = at(panel, ty[k], tx[k])
        assert abs(int(pixel[2]) - int(pixel[0])) < 40, ("tissue tinted as lung", panel, pixel)
        outside = at(panel, 1, 1)                               # air outside the body: untouched
        assert outside[0] == outside[1] == outside[2], outside
        checked += 1
    assert checked >= 1
    assert site.get(f"/api/v1/jobs/{job['id']}/preview.png", role=None).status_code == 401


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def test_dashboard_in_a_real_browser(site, browser):
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    browser.get(site.url + "/")
    assert "/login" in browser.current_url                   # no token yet: the login form
    browser.find_element(By.NAME, "token").send_keys(TOKENS["operator"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: browser.find_elements(By.ID, "worklist"), "the dashboard")
    browser.save_screenshot(str(ARTIFACTS / "dashboard-failed-delivery.png"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#worklist tr")[1:]
    assert "URGENT" in rows[0].text and "URGENT1" in rows[0].text and "ROUTINE1" in rows[1].text
    assert browser.find_element(By.CSS_SELECTOR, "#worklist .prio.urgent").value_of_css_property(
        "background-color") != browser.find_element(By.CSS_SELECTOR, "#worklist .prio.routine"
                                                    ).value_of_css_property("background-color")
    assert "CPUExecutionProvider" in browser.find_element(By.ID, "models").text
    failed = browser.find_elements(By.CSS_SELECTOR, "#failed button.retry")
    assert len(failed) == 2, browser.find_element(By.ID, "failed").text
    received = site.start_pacs()                             # the PACS is back
    failed[0].click()
    wait_for(lambda: browser.find_elements(By.ID, "worklist"), "the dashboard again")
    wait_for(lambda: len([d for j in site.jobs() for d in j["deliveries"] if d["status"] == "done"]) == 1,
             "the retried delivery done")
    assert len(list(received.rglob("*"))) >= 2                 # its SEG and SR reached the PACS
    browser.get(site.url + "/")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#failed button.retry")) == 1
    job = site.jobs(priority="urgent")[0]
    browser.get(f"{site.url}/jobs/{job['id']}")
    image = wait_for(lambda: browser.find_elements(By.ID, "preview"), "the job page")[0]
    wait_for(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image),
             "the picture loaded")
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 300
    browser.save_screenshot(str(ARTIFACTS / "job-page.png"))
    audit = site.get("/api/v1/audit", params={"action": "retry"}).json()["audit"]
    assert audit[0]["actor"] == "operator:operator-user"


def test_metrics_scraped_by_prometheus(site, tmp_path):
    text = site.get("/metrics", role=None).text            # Prometheus' own endpoint needs no token
    assert f'ainode_instances_received_total{{calling_aet="CTSCANNER"}} {float(len(site.routine.files))}' in text
    assert 'ainode_stage_seconds_bucket{le="0.01",model="ct-tissue",stage="decode"}' in text
    assert 'ainode_model_info{model="ct-tissue",provider="CPUExecutionProvider",version="1.0.0"} 1.0' in text
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: ainode
    static_configs: [{{targets: ["127.0.0.1:{site.http_port}"]}}]
""")
    log = tmp_path / "prometheus.log"
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=log.open("wb"),
                              stderr=subprocess.STDOUT, env={**os.environ})
    try:
        wait_for_port(port, server, log, 120)

        def query(expr: str) -> float | None:
            answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()
            result = answer.get("data", {}).get("result", [])
            return float(result[0]["value"][1]) if result else None

        assert wait_for(lambda: query("sum(ainode_instances_received_total)"), "a scrape") == site.sent
        assert query('sum(ainode_jobs{state="done"})') == 2
        assert query('ainode_associations_total{outcome="accepted"}') >= 2
        assert query('sum(ainode_delivery_failures_total{destination="pacs"})') >= 2
    finally:
        stop_process(server)
