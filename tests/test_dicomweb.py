"""DICOMweb against software we did not write: ``dicomweb-client`` storing, searching and
retrieving; Orthanc with its DICOMweb plugin sending a study to the node by STOW-RS and
receiving the node's SEG and SR back by STOW-RS; and bad input, which gets the right HTTP
status and failure reason with nothing half-stored."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from conftest import free_port
from node.config.schema import Destination
from node.dicom.stow_client import stow_files
from node.synthetic.ct import make_ct_series
from nodeproc import REPO, NodeProcess, wait_for, write_config

VALIDATOR = REPO / "tests" / "tools" / "validate_dicom.sh"
TOKENS = {"viewer": "viewer-token-0123456789", "sender": "sender-token-0123456789",
          "orthanc": "orthanc-token-0123456789", "operator": "operator-token-0123456789"}
SLICES, SIZE = 12, 96
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class WebNode:
    """A node whose HTTP face takes STOW-RS; CT goes to ct-tissue and the results to
    ``results_to`` (a DICOMweb destination)."""

    def __init__(self, tmp: Path, models: Path, destinations: list[dict], send_to: list[str],
                 max_upload_mb: int = 4096, http_port: int | None = None) -> None:
        tokens = tmp / "tokens"
        tokens.write_text(f"viewer viewer {TOKENS['viewer']}\nsender WEBSENDER {TOKENS['sender']}\n"
                          f"sender ORTHANC {TOKENS['orthanc']}\noperator ops {TOKENS['operator']}\n")
        tokens.chmod(0o600)
        self.http_port, port = http_port or free_port(), free_port()
        config = write_config(tmp / "node.toml", {
            "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp / "data")},
            "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 0},
            "inference": {"models_dir": str(models), "providers": ["CPUExecutionProvider"]},
            "delivery": {"max_attempts": 3, "backoff_s": 0.2, "timeout_s": 10},
            "http": {"host": "127.0.0.1", "port": self.http_port, "tokens_file": str(tokens),
                     "max_upload_mb": max_upload_mb, "idle_timeout_s": 2.0},
            "destinations": destinations,
            "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": send_to}],
        })
        self.node = NodeProcess(config=config, port=port, data_dir=tmp / "data", log=tmp / "node.log").start_waiting_for("HTTP on http://")
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.web = f"{self.url}/dicomweb"

    def client(self, role: str) -> DICOMwebClient:
        return DICOMwebClient(url=self.web, headers={"Authorization": f"Bearer {TOKENS[role]}"})

    def jobs(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/jobs", headers={"Authorization": f"Bearer {TOKENS['viewer']}"},
                         timeout=30).json()["jobs"]

    def post(self, body: bytes | object, content_type: str, path: str = "/studies", role: str = "sender",
             **headers: str) -> httpx.Response:
        h = {"Content-Type": content_type, **headers}
        if role:
            h["Authorization"] = f"Bearer {TOKENS[role]}"
        return httpx.post(self.web + path, content=body, headers=h, timeout=60)

    def stored(self) -> int:
        return httpx.get(f"{self.url}/api/v1/status", headers={"Authorization": f"Bearer {TOKENS['viewer']}"},
                         timeout=30).json()["instances"]["stored"]

    def tmp_files(self) -> list[Path]:
        return list((self.node.data_dir / "tmp").glob("*.part"))


def multipart(parts: list[bytes], boundary: str = "b0undary", part_type: str = "application/dicom") -> bytes:
    body = b"".join(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--\r\n".encode()


CT = 'multipart/related; type="application/dicom"; boundary=b0undary'


@pytest.fixture(scope="module")
def site(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("dicomweb")
    node = WebNode(tmp, models_dir, [], [], max_upload_mb=2)
    yield node
    node.node.stop()


def test_dicomweb_client_stores_searches_and_retrieves(site, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=SLICES, size=SIZE, accession="WEB0001",
                             patient_id="WEB-PATIENT-1", patient_name="Web^Patient")
    datasets = [pydicom.dcmread(f) for f in phantom.files]
    before = site.stored()
    answer = site.client("sender").store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == SLICES and "FailedSOPSequence" not in answer
    assert answer.RetrieveURL.endswith(f"/dicomweb/studies/{phantom.study_uid}")
    assert site.stored() == before + SLICES

    # the job runs as for a C-STORE, with the token's name as the calling AE title
    job = wait_for(lambda: next((j for j in site.jobs() if j["study_uid"] == phantom.study_uid
                                 and j["status"] == "done"), None), "the job of the stored series")
    detail = httpx.get(f"{site.url}/api/v1/jobs/{job['id']}", timeout=30,
                       headers={"Authorization": f"Bearer {TOKENS['viewer']}"}).json()
    assert detail["calling_aet"] == "WEBSENDER" and detail["caller_address"] == "127.0.0.1"

    viewer = site.client("viewer")
    studies = viewer.search_for_studies(search_filters={"PatientID": "WEB-PATIENT-1"})
    assert len(studies) == 1
    study = pydicom.Dataset.from_json(studies[0])
    assert study.StudyInstanceUID == phantom.study_uid and study.AccessionNumber == "WEB0001"
    assert str(study.PatientName) == "Web^Patient"
    assert viewer.search_for_studies(search_filters={"PatientName": "Web*"})[0] == studies[0]
    assert viewer.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    date = datasets[0].StudyDate
    assert len(viewer.search_for_studies(search_filters={"StudyDate": f"{date}-{date}",
                                                          "PatientID": "WEB-PATIENT-1"})) == 1

    # the node's results sit in the study beside the images, and can be retrieved
    series = [pydicom.Dataset.from_json(s) for s in viewer.search_for_series(phantom.study_uid)]
    assert sorted(s.Modality for s in series) == ["CT", "SEG", "SR"]
    assert set(study.ModalitiesInStudy) == {"CT", "SEG", "SR"} and study.NumberOfStudyRelatedSeries == 3
    seg_series = next(s for s in series if s.Modality == "SEG")
    seg = viewer.retrieve_series(phantom.study_uid, seg_series.SeriesInstanceUID)
    assert len(seg) == 1 and seg[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg[0].StudyInstanceUID == phantom.study_uid

    instances = viewer.search_for_instances(phantom.study_uid, phantom.series_uid)
    assert len(instances) == SLICES
    first = datasets[0]
    got = viewer.retrieve_instance(phantom.study_uid, phantom.series_uid, first.SOPInstanceUID)
    assert np.array_equal(got.pixel_array, first.pixel_array)
    meta = viewer.retrieve_series_metadata(phantom.study_uid, phantom.series_uid)
    assert len(meta) == SLICES and all("7FE00010" in m and "BulkDataURI" in m["7FE00010"] for m in meta)
    frames = viewer.retrieve_instance_frames(phantom.study_uid, phantom.series_uid, first.SOPInstanceUID, [1])
    assert frames[0] == first.PixelData

    response = httpx.get(f"{site.web}/studies", params={"PatientID": "WEB-PATIENT-1", "Colour": "blue"},
                         headers={"Authorization": f"Bearer {TOKENS['viewer']}"}, timeout=30)
    assert response.status_code == 200 and "Colour" in response.headers["warning"]
    odd = httpx.get(f"{site.web}/studies?bad%0d%0aX-Injected:%20yes=1",
                    headers={"Authorization": f"Bearer {TOKENS['viewer']}"}, timeout=30)
    assert odd.status_code == 200 and "x-injected" not in odd.headers


def test_roles_for_dicomweb(site, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=1, size=32, accession="WEBROLE")
    body = multipart([phantom.files[0].read_bytes()])
    assert site.post(body, CT, role="").status_code == 401
    assert site.post(body, CT, role="viewer").status_code == 403
    search = httpx.get(f"{site.web}/studies", headers={"Authorization": f"Bearer {TOKENS['sender']}"}, timeout=30)
    assert search.status_code == 403                 # a sender stores, it does not read


def _json_items(response: httpx.Response, tag: str) -> list[dict]:
    return response.json().get(tag, {}).get("Value", [])


def test_bad_stow_requests_get_their_status_and_store_nothing(site, tmp_path):
    good = make_ct_series(tmp_path / "good", slices=2, size=32, accession="WEBBAD1")
    first, second = (f.read_bytes() for f in good.files)
    before = site.stored()

    r = site.post(b'{"not": "dicom"}', "application/json")
    assert r.status_code == 415
    cut = multipart([first, second])[:-40]
    r = site.post(cut, CT)
    assert r.status_code == 400 and "cut short" in r.json()["detail"]
    assert site.post(b"--b0undary\r\nContent-Type: application/dicom\r\n", CT).status_code == 400

    r = site.post(multipart([b"this is not a DICOM file at all" * 10]), CT)
    assert r.status_code == 409
    assert [f["00081197"]["Value"][0] for f in _json_items(r, "00081198")] == [0xC000]

    no_uids = pydicom.dcmread(good.files[0])
    del no_uids.StudyInstanceUID, no_uids.SeriesInstanceUID
    path = tmp_path / "no-uids.dcm"
    no_uids.save_as(path)
    r = site.post(multipart([path.read_bytes()]), CT)
    assert r.status_code == 409 and _json_items(r, "00081198")[0]["00081197"]["Value"] == [0xC000]
    assert _json_items(r, "00081198")[0]["00081155"]["Value"] == [no_uids.SOPInstanceUID]

    r = site.post(multipart([first], part_type="text/plain"), CT)
    assert r.status_code == 409

    other_study = generate_uid()
    r = site.post(multipart([first]), CT, path=f"/studies/{other_study}")
    assert r.status_code == 409 and _json_items(r, "00081198")[0]["00081197"]["Value"] == [0xA900]

    big = multipart([b"\0" * (3 * 1024 * 1024)])          # http.max_upload_mb is 2 here
    assert site.post(big, CT).status_code == 413                     # declared by Content-Length

    def chunks():                                                    # and not declared (chunked)
        yield b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(3):
            yield b"\0" * (1024 * 1024)
    assert site.post(chunks(), CT).status_code == 413

    assert site.stored() == before                                   # nothing of the above stored
    assert site.tmp_files() == []                                    # and no temporary file left

    r = site.post(multipart([first, b"garbage" * 20, second]), CT)   # one bad part among good ones
    assert r.status_code == 202
    assert len(_json_items(r, "00081199")) == 2 and len(_json_items(r, "00081198")) == 1
    assert site.stored() == before + 2
    assert site.node.echo()                                          # and the node serves on
    log = site.node.log_text()
    assert "STOW-RS from WEBSENDER at 127.0.0.1 refused 413" in log
    assert "cut short" in log and "Traceback" not in log


def test_a_stalled_upload_is_cut_and_stores_nothing(site, tmp_path):
    """A client that sends part of a body and then nothing is answered 408 after
    http.idle_timeout_s (2 s here); nothing is stored and no temporary file is left."""
    import socket
    phantom = make_ct_series(tmp_path / "ct", slices=1, size=32, accession="WEBSTALL")
    body = multipart([phantom.files[0].read_bytes()])
    before = site.stored()
    with socket.create_connection(("127.0.0.1", site.http_port), timeout=60) as sock:
        sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {CT}\r\n"
                      f"Authorization: Bearer {TOKENS['sender']}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                     + body[:len(body) // 2])
        started = time.monotonic()
        answer = sock.recv(4096).decode(errors="replace")
        waited = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert 1.5 < waited < 30
    assert site.stored() == before and site.tmp_files() == []
    assert "no data for 2 s" in site.node.log_text()


def test_stow_client_reports_per_instance_refusals(site, tmp_path):
    """The node's own STOW-RS client, sending to the node: a SOP class no storage SCP takes is
    refused with its reason, the rest is sent."""
    ok = make_ct_series(tmp_path / "ok", slices=1, size=32, accession="WEBCLI1")
    odd = pydicom.dcmread(ok.files[0])
    odd.SOPClassUID = odd.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5.6.7"
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    odd_path = tmp_path / "odd.dcm"
    odd.save_as(odd_path)
    token = tmp_path / "token"
    token.write_text(TOKENS["sender"] + "\n")
    dest = Destination(name="self", ae_title="", type="dicomweb", url=site.web + "/", token_file=str(token))
    report = stow_files([ok.files[0], odd_path], dest)
    assert report.sent == 1
    assert report.refused == [(str(odd_path), "STOW-RS failure reason 0x0122 (HTTP 202)")]
    wrong = Destination(name="self", ae_title="", type="dicomweb", url=site.web + "/")     # no token
    with pytest.raises(Exception, match="HTTP 401"):
        stow_files([ok.files[0]], wrong)


def test_orthanc_sends_by_stow_and_receives_the_results_by_stow(tmp_path, models_dir, orthanc_factory):
    node_http = free_port()
    orthanc = orthanc_factory(
        aet="WEBPACS", Plugins=[DICOMWEB_PLUGIN],
        DicomWeb={"Enable": True, "Root": "/dicom-web/",
                  "Servers": {"node": {"Url": f"http://127.0.0.1:{node_http}/dicomweb/",
                                       "HttpHeaders": {"Authorization": f"Bearer {TOKENS['orthanc']}"}}}})
    phantom = make_ct_series(tmp_path / "ct", slices=SLICES, size=SIZE, accession="ORTHWEB1")
    for f in phantom.files:
        orthanc.request("POST", "/instances", f.read_bytes())
    study_id = orthanc.studies()[0]

    site = WebNode(tmp_path, models_dir, [{"name": "orthanc-web", "type": "dicomweb", "ae_title": "ORTHANC",
                                           "url": f"{orthanc.http_url}/dicom-web/"}], ["@origin"],
                   http_port=node_http)
    proc = site.node
    try:
        answer = orthanc.request("POST", "/dicom-web/servers/node/stow", {"Resources": [study_id]})
        assert answer is not None
        wait_for(lambda: len(orthanc.get(f"/studies/{study_id}")["Series"]) == 3,
                 "SEG and SR in Orthanc's study", timeout=180)
        modalities = sorted(orthanc.get(f"/series/{s}")["MainDicomTags"]["Modality"]
                            for s in orthanc.get(f"/studies/{study_id}")["Series"])
        assert modalities == ["CT", "SEG", "SR"]
        results = []
        for s in orthanc.get(f"/studies/{study_id}")["Series"]:
            info = orthanc.get(f"/series/{s}")
            if info["MainDicomTags"]["Modality"] in ("SEG", "SR"):
                for i in info["Instances"]:
                    path = tmp_path / f"{i}.dcm"
                    path.write_bytes(orthanc.request("GET", f"/instances/{i}/file"))
                    results.append(path)
        assert len(results) == 2
        check = subprocess.run(["bash", str(VALIDATOR), *map(str, results)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        log = proc.log_text()
        assert f"STOW-RS from ORTHANC at 127.0.0.1: {SLICES} instances stored" in log
        assert "files sent" in log
    finally:
        proc.stop()
