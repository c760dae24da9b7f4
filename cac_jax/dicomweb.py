"""Studies from a PACS over DICOMweb, results back into it (`cac-jax infer --dicomweb`,
docs/clinical.md), with dicomweb-client.

- Selection: `--study UID ...`, or QIDO-RS study search terms (`--query KEY=VALUE`, e.g.
  `ModalitiesInStudy=CT`, `StudyDate=20260101-20261231`). Each study is one row of results.csv,
  its scan id the StudyInstanceUID.
- Pull (WADO-RS): the study's CT series (QIDO-RS series search, Modality=CT; only the `--series`
  one when given, by SeriesNumber or SeriesInstanceUID) into `OUT/dicomweb/<study>/`; the study
  reader then takes the series closest to 3 mm as for a local folder. A series is downloaded once:
  a finished one is marked, so a rerun or a resumed batch does not fetch it again.
- Push (STOW-RS, `--push`): the study's Segmentation and SR (`cac_jax.dicom_outputs`) into the
  same study; a server that refuses an instance is an error of that study.
- Credentials never on the command line: a file (`--credentials FILE`, lines `username=...` and
  `password=...`, or `token=...`), else the environment (`CAC_JAX_DICOMWEB_USER` and
  `CAC_JAX_DICOMWEB_PASSWORD`, or `CAC_JAX_DICOMWEB_TOKEN`), else none.
- Every request has a timeout; connection failures and 408/429/503/504 answers are retried with
  exponential back-off; what still fails is one line naming the server and the cause. A study
  that cannot be fetched or pushed is an error row and the batch goes on; an unreachable server
  at the study search stops the run (exit code 2).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from data_pipeline.errors import InputError

ENV_USER = "CAC_JAX_DICOMWEB_USER"
ENV_PASSWORD = "CAC_JAX_DICOMWEB_PASSWORD"
ENV_TOKEN = "CAC_JAX_DICOMWEB_TOKEN"
CACHE_FOLDER = "dicomweb"
_DONE = ".complete"   # marks a fully downloaded series folder
QIDO_PAGE = 100       # results asked for per QIDO-RS request


class DicomWebError(InputError):
    """The DICOMweb server could not be reached or refused a request."""


def read_credentials(path: str | os.PathLike | None,
                     env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """{"username", "password"} or {"token"} from the file `path` (key=value lines, # comments),
    else from the environment; {} when neither gives any."""
    if path is not None:
        values: dict[str, str] = {}
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(path, f"cannot read the credentials file: {err}") from err
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or key.strip() not in ("username", "password", "token"):
                raise InputError(path, f"line {number}: expected username=, password= or "
                                       "token=")
            values[key.strip()] = value.strip()
    else:
        values = {k: env[e] for k, e in (("username", ENV_USER), ("password", ENV_PASSWORD),
                                         ("token", ENV_TOKEN)) if env.get(e)}
    if "token" in values and ("username" in values or "password" in values):
        raise InputError(path, "give either a token or a username and password, not both")
    if ("username" in values) != ("password" in values):
        raise InputError(path, "a username needs a password (and a password a username)")
    return values


def parse_queries(queries: Sequence[str]) -> dict[str, str]:
    """QIDO-RS search terms from KEY=VALUE strings."""
    terms: dict[str, str] = {}
    for query in queries:
        key, sep, value = query.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(None, f"--query {query!r}: expected KEY=VALUE, e.g. "
                                   "ModalitiesInStudy=CT")
        terms[key.strip()] = value.strip()
    return terms


def _value(item: Mapping, tag: str) -> str:
    """A value of a DICOM JSON (QIDO-RS) result by its tag (e.g. "0020000D"), '' if absent."""
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


class Pacs:
    """A DICOMweb server (QIDO-RS, WADO-RS, STOW-RS) as `cac-jax infer` uses it."""

    def __init__(self, url: str, *, credentials: str | os.PathLike | None = None,
                 timeout: float = 60.0, retries: int = 3,
                 env: Mapping[str, str] = os.environ):
        import requests
        from dicomweb_client.api import DICOMwebClient
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        if not url.startswith(("http://", "https://")):
            raise InputError(None, f"--dicomweb {url!r}: expected an http:// or https:// URL")
        if timeout <= 0 or retries < 0:
            raise InputError(None, "--timeout must be > 0 and --retries >= 0")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        secret = read_credentials(credentials, env)
        session = requests.Session()
        if "token" in secret:
            session.headers["Authorization"] = f"Bearer {secret['token']}"
        elif secret:
            session.auth = (secret["username"], secret["password"])
        # Connection failures (refused, reset, DNS) are retried here; answers that say "try
        # again" by dicomweb-client below. Both back off exponentially.
        adapter = HTTPAdapter(max_retries=Retry(total=self.retries, connect=self.retries,
                                                read=0, status=0, backoff_factor=0.5,
                                                allowed_methods=None))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self.client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
        self.client.set_http_retry_params(retry=self.retries > 0,
                                          max_attempts=self.retries + 1,
                                          wait_exponential_multiplier=500)
        self._uids: dict[Path, str] = {}

    def _failure(self, what: str, err: Exception) -> DicomWebError:
        import requests

        if isinstance(err, requests.HTTPError) and err.response is not None:
            code = err.response.status_code
            hint = " (check the credentials)" if code in (401, 403) else ""
            return DicomWebError(self.url, f"{what}: HTTP {code} {err.response.reason}{hint}")
        if isinstance(err, requests.Timeout):
            return DicomWebError(self.url, f"{what}: no answer within {self.timeout:g} s "
                                           f"(--timeout), {self.retries} retries")
        if isinstance(err, requests.ConnectionError):
            return DicomWebError(self.url, f"{what}: cannot reach the server after "
                                           f"{self.retries} retries ({type(err).__name__})")
        return DicomWebError(self.url, f"{what}: {type(err).__name__}: {err}")

    def _call(self, what: str, fn, *args, **kwargs):
        import requests
        from retrying import RetryError

        try:
            return fn(*args, **kwargs)
        except (requests.RequestException, RetryError, ValueError) as err:
            if isinstance(err, RetryError):
                result = err.last_attempt.value
                err = requests.HTTPError(response=result) if isinstance(
                    result, requests.Response) else RuntimeError(str(result))
            raise self._failure(what, err) from err

    def _search(self, what: str, fn, key: str, **kwargs) -> list[dict]:
        """All results of a QIDO-RS search, page by page (limit/offset), unique by the UID
        `key`. Stops at a short page, or at a page with nothing new (a server that ignores
        offset, as some do, would otherwise be asked forever)."""
        results: dict[str, dict] = {}
        offset = 0
        while True:
            page = self._call(what, fn, limit=QIDO_PAGE, offset=offset, **kwargs)
            new = {_value(item, key): item for item in page if _value(item, key) not in results}
            results.update(new)
            if len(page) < QIDO_PAGE or not new:
                return list(results.values())
            offset += len(page)

    def studies(self, uids: Sequence[str] | None, queries: Sequence[str] | None,
                out: str | os.PathLike, series: str | None = None) -> list:
        """The studies to score (`cac_jax.inference.Study`, image: the local cache folder)."""
        from cac_jax.inference import Study, safe_name

        if uids:
            selected = list(dict.fromkeys(uids))
        else:
            terms = parse_queries(queries or ())
            found = self._search("QIDO-RS study search", self.client.search_for_studies,
                                 "0020000D", search_filters=terms, fields=["StudyInstanceUID"])
            selected = list(dict.fromkeys(_value(item, "0020000D") for item in found))
            selected = [uid for uid in selected if uid]
            if not selected:
                raise InputError(None, f"no study on {self.url} matches "
                                       + " ".join(f"{k}={v}" for k, v in terms.items()))
        root = Path(out) / CACHE_FOLDER
        studies = []
        for uid in selected:
            folder = root / safe_name(uid)
            self._uids[folder.resolve()] = uid
            studies.append(Study(uid, folder, "", series))
        return studies

    def fetch(self, study_uid: str, folder: str | os.PathLike, series: str | None = None) -> Path:
        """Downloads the study's CT series (or the `series` one) into `folder` over WADO-RS."""
        from data_pipeline.atomic import atomic_path, atomic_write_text

        folder = Path(folder)
        found = self._search(f"study {study_uid}: QIDO-RS series search",
                             self.client.search_for_series, "0020000E",
                             study_instance_uid=study_uid, search_filters={"Modality": "CT"})
        if series is not None:
            found = [s for s in found if series in (_value(s, "0020000E"), _value(s, "00200011"))]
        if not found:
            which = f"series {series!r}" if series is not None else "CT series"
            raise DicomWebError(self.url, f"study {study_uid}: no {which} on the server")
        for item in found:
            series_uid = _value(item, "0020000E")
            target = folder / series_uid
            if (target / _DONE).exists():
                continue  # downloaded by an earlier run
            target.mkdir(parents=True, exist_ok=True)
            datasets = self._call(f"study {study_uid}: WADO-RS series {series_uid}",
                                  self.client.retrieve_series, study_uid, series_uid)
            for ds in datasets:
                with atomic_path(target / f"{ds.SOPInstanceUID}.dcm") as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
            atomic_write_text(target / _DONE, f"{len(datasets)}\n")
        return folder

    def study_uid_of(self, folder: str | os.PathLike) -> str | None:
        """The StudyInstanceUID `studies` cached into `folder` (None for another folder)."""
        return self._uids.get(Path(folder).resolve())

    def pulling(self, scorer) -> _PullingScorer:
        """`scorer`, fetching each study from the server before reading it."""
        return _PullingScorer(scorer, self)

    def push(self, study, paths: Sequence[Path]) -> None:
        """Stores the files `paths` (the SEG and the SR) into the study over STOW-RS."""
        import pydicom

        datasets = [pydicom.dcmread(p) for p in paths]
        uid = str(datasets[0].StudyInstanceUID)
        response = self._call(f"study {uid}: STOW-RS", self.client.store_instances,
                              datasets, study_instance_uid=uid)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')} (reason "
                                f"{item.get('FailureReason', '?')})" for item in failed)
            raise DicomWebError(self.url, f"study {uid}: STOW-RS refused {reasons}")


class _PullingScorer:
    """A Scorer whose `score_path` first fetches the study (the batch's per-study errors then
    cover a failed download); every other attribute is the wrapped Scorer's."""

    def __init__(self, scorer, pacs: Pacs):
        self._scorer = scorer
        self._pacs = pacs

    def __getattr__(self, name: str):
        return getattr(self._scorer, name)

    def score_path(self, path, *, series=None, **kwargs):
        uid = self._pacs.study_uid_of(path)
        if uid is None:
            raise ValueError(f"{path}: not a study selected on {self._pacs.url}")
        self._pacs.fetch(uid, path, series)
        return self._scorer.score_path(path, series=series, **kwargs)
