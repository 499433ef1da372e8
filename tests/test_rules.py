"""The rule language, on a table of cases: every operator, missing and empty attributes,
multi-valued attributes, tags, nested sequences, association facts and character sets."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from node.config.schema import parse_config
from node.errors import ConfigError
from node.config.rules import Facts, compile_rule

ASSOCIATION = {"CallingAETitle": "CT1", "CalledAETitle": "AINODE", "CallerAddress": "10.1.2.3"}


def header(**values) -> Dataset:
    """A CT header; keyword arguments override or add attributes (None removes one)."""
    ds = Dataset()
    ds.Modality = "CT"
    ds.StudyDescription = "CHEST PE"
    ds.SeriesDescription = "Axial 1.0 mm"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.WindowCenter = ["40", "400"]
    ds.StudyDate = "20240315"
    ds.PatientAge = "045Y"
    ds.InstitutionName = ""
    code = Dataset()
    code.CodeValue = "RPID16"
    code.CodeMeaning = "CT CHEST WITH CONTRAST"
    ds.ProcedureCodeSequence = [code]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", "TRAUMA")
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


# (rule table, header overrides, holds, a fragment of the reason)
CASES = [
    # equality, lists, wildcards, case, numbers
    ({"Modality": "CT"}, {}, True, "Modality is 'CT'"),
    ({"Modality": "ct"}, {}, True, ""),                                         # case-insensitive
    ({"Modality": "MR"}, {}, False, "Modality='CT' matches none of ['MR']"),
    ({"Modality": ["MR", "CT"]}, {}, True, "is one of"),
    ({"Modality": ["MR", "PT"]}, {}, False, "matches none of ['MR', 'PT']"),
    ({"BodyPartExamined": "CHE*"}, {}, True, ""),
    ({"BodyPartExamined": "CHES?"}, {}, True, ""),
    ({"BodyPartExamined": "CHE?"}, {}, False, "matches none"),
    ({"BodyPartExamined": "CHEST"}, {"BodyPartExamined": "CHEST "}, True, ""),   # padding
    ({"SliceThickness": 1}, {}, True, "SliceThickness is 1"),                 # numeric equality ("1.0")
    ({"SliceThickness": "1"}, {}, False, "matches none of ['1']"),            # a string compares as text
    ({"SliceThickness": {"eq": [1, 2]}}, {"SliceThickness": "2.00"}, True, ""),
    # regular expressions
    ({"StudyDescription": {"regex": "^CHEST"}}, {}, True, "matches regex '^CHEST'"),
    ({"StudyDescription": {"regex": "^chest"}}, {}, False, "does not match regex '^chest'"),
    ({"StudyDescription": {"regex": "(?i)^chest"}}, {}, True, ""),
    ({"StudyDescription": {"regex": "P[EO]$"}}, {}, True, ""),                # searched, not anchored
    # numeric ranges and comparisons
    ({"SliceThickness": {"range": [0.5, 1.0]}}, {}, True, "is >= 0.5 and <= 1"),
    ({"SliceThickness": {"range": [0.5, 1.0]}}, {"SliceThickness": "1.25"}, False, "is not >= 0.5 and <= 1"),
    ({"SliceThickness": {"gt": 1}}, {}, False, "SliceThickness='1.0' is not > 1"),
    ({"SliceThickness": {"ge": 1}}, {}, True, ""),
    ({"SliceThickness": {"lt": 1}}, {}, False, ""),
    ({"SliceThickness": {"le": 1, "gt": 0.5}}, {}, True, "is > 0.5 and <= 1"),
    ({"StudyDate": {"range": [20240101, 20241231]}}, {}, True, ""),           # dates as numbers
    ({"PatientAge": {"gt": 18}}, {}, False, "PatientAge='045Y' is not a number"),
    # presence and absence
    ({"BodyPartExamined": {"present": True}}, {}, True, "is present"),
    ({"BodyPartExamined": {"present": True}}, {"BodyPartExamined": None}, False, "BodyPartExamined is absent"),
    ({"BodyPartExamined": {"present": False}}, {"BodyPartExamined": None}, True, ""),
    ({"InstitutionName": {"present": False}}, {}, True, ""),                   # empty counts as absent
    ({"InstitutionName": "*"}, {}, False, "InstitutionName is absent"),
    ({"ContrastBolusAgent": "*"}, {}, False, "ContrastBolusAgent is absent"),
    ({"ContrastBolusAgent": {"gt": 1}}, {}, False, "ContrastBolusAgent is absent"),
    # negation
    ({"Modality": {"not": "MR"}}, {}, True, "not (is 'MR')"),
    ({"Modality": {"not": ["CT", "PT"]}}, {}, False, "Modality='CT' is one of ['CT', 'PT'] (excluded by not)"),
    ({"Modality": {"not": "MR"}}, {"Modality": None}, True, ""),              # absent satisfies not
    ({"Modality": {"present": True, "not": "MR"}}, {"Modality": None}, False, "Modality is absent"),
    ({"StudyDescription": {"not": {"regex": "ABD"}}}, {}, True, ""),
    ({"SliceThickness": {"not": {"gt": 3}}}, {}, True, ""),
    # multi-valued attributes: any value satisfies; not: none may
    ({"ImageType": "AXIAL"}, {}, True, ""),
    ({"ImageType": "LOCALIZER"}, {}, False, "ImageType='ORIGINAL\\PRIMARY\\AXIAL' matches none"),
    ({"ImageType": {"not": "LOCALIZER"}}, {}, True, ""),
    ({"ImageType": {"not": "PRIMARY"}}, {}, False, "excluded by not"),
    ({"WindowCenter": {"gt": 300}}, {}, True, ""),
    ({"WindowCenter": {"gt": 500}}, {}, False, "is not > 500"),
    # tags, private tags, attributes inside sequences
    ({"(0018,0050)": 1}, {}, True, "SliceThickness is 1"),
    ({"00180050": {"lt": 2}}, {}, True, ""),
    ({"(0009,1001)": "TRAUMA"}, {}, True, ""),
    ({"(0009,1001)": "ELECTIVE"}, {}, False, "(0009,1001)='TRAUMA' matches none"),
    ({"CodeMeaning": "*CHEST*"}, {}, True, ""),                               # inside ProcedureCodeSequence
    ({"ProcedureCodeSequence": {"present": True}}, {}, True, ""),
    ({"TransferSyntaxUID": "1.2.840.10008.1.2.4.*"}, {}, True, ""),            # file meta
    # association facts
    ({"CallingAETitle": "CT?"}, {}, True, ""),
    ({"CallingAETitle": "MR*"}, {}, False, "CallingAETitle='CT1' matches none of ['MR*']"),
    ({"CalledAETitle": "AINODE"}, {}, True, ""),
    ({"CallerAddress": "10.1.*"}, {}, True, ""),
    ({"CallerAddress": {"network": "10.0.0.0/8"}}, {}, True, "CallerAddress is in 10.0.0.0/8"),
    ({"CallerAddress": {"network": ["192.168.0.0/16", "172.16.0.0/12"]}}, {}, False, "is not in 192.168.0.0/16"),
    # combinations
    ({"Modality": "CT", "BodyPartExamined": "HEAD"}, {}, False, "BodyPartExamined='CHEST'"),
    ({"any": [{"Modality": "MR"}, {"StudyDescription": {"regex": "PE$"}}]}, {}, True, "matches regex"),
    ({"any": [{"Modality": "MR"}, {"Modality": "PT"}]}, {}, False,
     "none of the alternatives holds: Modality='CT' matches none of ['MR'] | Modality='CT' matches none of ['PT']"),
    ({"all": [{"Modality": "CT"}, {"any": [{"CallingAETitle": "ER*"}, {"(0009,1001)": "TRAUMA"}]}]}, {}, True, ""),
    ({"none": [{"ImageType": "LOCALIZER"}, {"SeriesDescription": "*scout*"}]}, {}, True, ""),
    ({"none": [{"ImageType": "LOCALIZER"}, {"SeriesDescription": "*axial*"}]}, {}, False,
     "excluded because SeriesDescription is '*axial*'"),
    ({}, {}, True, "no conditions"),
]


@pytest.mark.parametrize("table, overrides, holds, reason", CASES,
                         ids=[f"{i}-{next(iter(c[0]), 'empty')}" for i, c in enumerate(CASES)])
def test_rule_table(table, overrides, holds, reason):
    verdict = compile_rule(table, "match").evaluate(Facts(header(**overrides), ASSOCIATION))
    assert verdict.holds is holds, verdict.reason
    assert reason in verdict.reason


def roundtrip(charset: str, **values) -> Dataset:
    """Write a header in ``charset`` and read it back, as the node reads a stored file."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.SpecificCharacterSet = charset
    for key, value in values.items():
        setattr(ds, key, value)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()), stop_before_pixels=True), buf.getvalue()


@pytest.mark.parametrize("charset, values, encoded, table, holds", [
    ("ISO_IR 100", {"PatientName": "Müller^Jürgen", "StudyDescription": "Thorax ÜBERSICHT"},
     "Müller".encode("latin-1"), {"PatientName": "müller^*", "StudyDescription": {"regex": "ÜBERSICHT$"}}, True),
    ("ISO_IR 100", {"InstitutionName": "Hôpital Cochin"}, "Hôpital".encode("latin-1"),
     {"InstitutionName": "HÔPITAL*"}, True),
    ("ISO_IR 192", {"PatientName": "Дмитриев^Иван", "StudyDescription": "КТ грудной клетки"},
     "Дмитриев".encode("utf-8"), {"PatientName": "дмитриев*", "StudyDescription": {"regex": "^КТ"}}, True),
    ("ISO_IR 192", {"PatientName": "山田^太郎", "InstitutionName": "東京病院"}, "山田".encode("utf-8"),
     {"PatientName": "山田*", "InstitutionName": {"not": "*大阪*"}}, True),
    ("ISO_IR 192", {"StudyDescription": "KT grudnoj kletki"}, b"KT",
     {"StudyDescription": {"regex": "^КТ"}}, False),                # Cyrillic КТ is not Latin KT
])
def test_character_sets_are_decoded_before_matching(charset, values, encoded, table, holds):
    ds, raw = roundtrip(charset, **values)
    assert encoded in raw                                            # the file really is in that charset
    verdict = compile_rule(table, "match").evaluate(Facts(ds, {}))
    assert verdict.holds is holds, verdict.reason


def test_bytes_invalid_in_the_character_set_are_replaced_not_fatal():
    _, raw = roundtrip("ISO_IR 192", StudyDescription="CHEST broken")
    ds = pydicom.dcmread(BytesIO(raw.replace(b"CHEST", b"\xff\xfeEST")), stop_before_pixels=True)
    with pytest.warns(UserWarning, match="Failed to decode"):
        verdict = compile_rule({"StudyDescription": "*EST broken"}, "match").evaluate(Facts(ds, {}))
    assert verdict.holds, verdict.reason


def test_rules_are_frozen_and_compiled_once():
    rule = compile_rule({"Modality": {"regex": "^C"}, "any": [{"CallingAETitle": "X"}]}, "match")
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.mode = "any"  # type: ignore[misc]
    assert hash(rule) == hash(compile_rule({"Modality": {"regex": "^C"}, "any": [{"CallingAETitle": "X"}]}, "m"))


def _route(**keys):
    return {"routes": [{"name": "r", "models": ["m"], **keys}]}


@pytest.mark.parametrize("data, where", [
    (_route(match={"Modalty": "CT"}), "routes[0].match.Modalty: not a DICOM keyword"),
    (_route(match={"(0018,005)": 1}), "routes[0].match.(0018,005)"),
    (_route(match={"StudyDescription": {"regex": "(["}}), "routes[0].match.StudyDescription.regex: invalid regular"),
    (_route(match={"Modality": {"like": "CT"}}), "routes[0].match.Modality.like: unknown operator"),
    (_route(match={"Modality": {}}), "routes[0].match.Modality: empty operator table"),
    (_route(match={"SliceThickness": {"range": [5, 1]}}), "routes[0].match.SliceThickness.range"),
    (_route(match={"SliceThickness": {"range": [1]}}), "routes[0].match.SliceThickness.range"),
    (_route(match={"SliceThickness": {"gt": "5"}}), "routes[0].match.SliceThickness.gt: expected a number"),
    (_route(match={"SliceThickness": {"gt": 5, "lt": 1}}), "routes[0].match.SliceThickness: the lower bound"),
    (_route(match={"Modality": {"present": "yes"}}), "routes[0].match.Modality.present"),
    (_route(match={"Modality": True}), "routes[0].match.Modality: expected a string or a number"),
    (_route(match={"Modality": []}), "routes[0].match.Modality: expected a value or a non-empty list"),
    (_route(match={"CallerAddress": {"network": "10.0.0.300/8"}}), "routes[0].match.CallerAddress.network"),
    (_route(match={"Modality": {"not": {"regex": "*"}}}), "routes[0].match.Modality.not.regex"),
    (_route(any=[{"Modality": "CT"}, {"Modalty": "MR"}]), "routes[0].any[1].Modalty"),
    (_route(match={"all": [{"none": [{"Modalty": "MR"}]}]}), "routes[0].match.all[0].none[0].Modalty"),
    (_route(any=[]), "routes[0].any: expected a non-empty list"),
    (_route(require_series=[{"SeriesDescription": "*AX*"}]), "routes[0].require_series: only for a route with level"),
    (_route(level="study", require_series=[{"SeriesDescriptio": "*AX*"}]), "routes[0].require_series[0].SeriesDescriptio"),
    (_route(level="patient"), "routes[0].level"),
    (_route(on_result=[{"finding": "X", "segment": "Y", "notify": True}]), "routes[0].on_result[0]: give either"),
    (_route(on_result=[{"segment": "Lungs", "notify": True}]), "routes[0].on_result[0].volume_ml: required"),
    (_route(on_result=[{"segment": "Lungs", "volume_ml": {"regex": "x"}, "notify": True}]),
     "routes[0].on_result[0].volume_ml: expected a number or a table"),
    (_route(on_result=[{"finding": "X"}]), "routes[0].on_result[0]: does nothing"),
    (_route(on_result=[{"finding": "X", "send_to": ["nowhere"]}]), "routes[0].on_result[0].send_to[0]"),
    (_route(on_result=[{"finding": "X", "model": "other", "notify": True}]), "routes[0].on_result[0].model"),
    (_route(on_result=[{"finding": "X", "priority": "asap"}]), "routes[0].on_result[0].priority"),
    ({"routes": [{"name": "a", "models": ["m"]}, {"name": "a", "models": ["m"]}]}, "routes[1].name"),
    ({"notify": {"webhook_url_env": "A", "webhook_url_file": "/x"}}, "notify: give webhook_url_env or"),
    ({"notify": {"webhook_url_env": "https://hooks.example/abc"}}, "notify.webhook_url_env: "),
    ({"notify": {"link_template": "https://v/{study}"}}, "notify.link_template: unknown placeholder {study}"),
    ({"notify": {"webhook_url": "https://x"}}, "notify.webhook_url"),      # the URL itself is refused
])
def test_bad_rules_name_their_key_path(data, where):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert where in str(exc.value)


def test_route_keys_combine_and_study_defaults():
    config = parse_config({
        "ingest": {"series_timeout_s": 4},
        "routes": [{"name": "r", "models": ["m"], "match": {"Modality": "CT"},
                    "any": [{"CallingAETitle": "ER*"}, {"StudyDescription": {"regex": "(?i)trauma"}}],
                    "none": [{"ImageType": "LOCALIZER"}], "level": "study",
                    "require_series": [{"SeriesDescription": "*AXIAL*"}],
                    "on_result": [{"segment": "Lungs", "volume_ml": {"gt": 5000}, "priority": "urgent"}]}]})
    route = config.routes[0]
    assert route.level == "study" and route.study_timeout_s == 4 and route.study_max_wait_s == 0
    assert route.on_result[0].volume_ml.contains(5001) and not route.on_result[0].volume_ml.contains(5000)
    facts = Facts(header(StudyDescription="Trauma CT"), {"CallingAETitle": "CT1"})
    assert route.rule.evaluate(facts).holds
    assert not route.rule.evaluate(Facts(header(ImageType=["DERIVED", "LOCALIZER"]), ASSOCIATION)).holds


def test_readme_configuration_examples_are_valid():
    """Every TOML example of the README's Configuration section loads (destinations added)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Configuration"):readme.index("## Triage")]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    destinations = "".join(f'[[destinations]]\nname = "{n}"\nae_title = "AE{i}"\nhost = "h"\nport = {i + 1}\n'
                           for i, n in enumerate(["pacs", "archive", "research", "er-viewer"]))
    for block in blocks:
        assert parse_config(tomllib.loads(destinations + block)).routes
