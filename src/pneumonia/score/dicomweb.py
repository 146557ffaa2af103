"""Films from a PACS over DICOMweb: ``pneumonia score dicomweb:<base URL>``.

QIDO-RS finds the CR and DX instances (optionally of one study date range, study or accession
number); those whose BodyPartExamined or ViewPosition names another body part or a lateral view
(the frontal-chest check's header rule, pneumonia.frontal) become rows saying why they were
skipped, unretrieved; the others are retrieved with WADO-RS and scored like any other file.
The key of a row is ``STUDY_UID/SERIES_UID/SOP_UID``.

The connection (:class:`DicomWebSettings`): credentials from the environment (basic or
bearer), TLS verified (a private CA through ``DICOMWEB_CA_BUNDLE``; there is no switch to turn
verification off), a connect and read timeout on every request, and at most
:data:`RETRIES` retries of a failed connection or a 429/502/503/504 answer, backing off.

Patient names and ids arrive in every QIDO answer and every file header: nothing here logs
a header or an answer, only UIDs and HTTP statuses.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Container, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pneumonia.score.rows import Item, ScoreError

if TYPE_CHECKING:
    import requests
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: ``pneumonia score dicomweb:https://pacs.example.org/dicom-web``
SCHEME = "dicomweb:"
PACS_HINT = "install it with: pip install 'pneumonia-detection[pacs]'"
#: Environment variables of the connection (docs/pacs.md).
USER_ENV = "DICOMWEB_USER"
PASSWORD_ENV = "DICOMWEB_PASSWORD"
TOKEN_ENV = "DICOMWEB_TOKEN"
CA_BUNDLE_ENV = "DICOMWEB_CA_BUNDLE"
#: Retries of one request after a refused or dropped connection or a 429/502/503/504 answer.
RETRIES = 3
RETRY_STATUSES = (429, 502, 503, 504)
#: Modalities of projection radiographs; QIDO matches one value at a time.
MODALITIES = ("CR", "DX")
#: Error code of a row that was found but is not a frontal chest film.
SKIPPED = "skipped_not_frontal_chest"
#: Error code of a row whose file could not be retrieved (the server answered, with an error).
RETRIEVE_FAILED = "retrieve_failed"

# QIDO attributes by tag, as DICOM JSON names them.
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_STUDY_DATE, _STUDY_TIME, _BODY_PART, _VIEW = "00080020", "00080030", "00180015", "00185101"
_FIELDS = ("StudyDate", "StudyTime", "BodyPartExamined", "ViewPosition")
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


def require_pacs() -> None:
    """Import the ``pacs`` extra, or explain how to get it."""
    try:
        import dicomweb_client  # noqa: F401
        import highdicom  # noqa: F401
    except ImportError:
        raise ScoreError(
            f"a dicomweb: input needs dicomweb-client and highdicom; {PACS_HINT}"
        ) from None


@dataclass(frozen=True)
class DicomWebSettings:
    """How to reach one DICOMweb service.

    Attributes:
        url: Base URL of the service (``https://host/dicom-web``), without ``dicomweb:``.
        user, password: HTTP basic credentials (``DICOMWEB_USER``, ``DICOMWEB_PASSWORD``).
        token: A bearer token (``DICOMWEB_TOKEN``), instead of basic credentials.
        ca_bundle: A CA certificate file to verify the server with (``DICOMWEB_CA_BUNDLE``);
            default: the system's.
        timeout: Seconds to wait for a connection and, separately, for each read.
    """

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if re.match(r"^([a-z]+://)?[^/@\s]*@", self.url):
            raise ScoreError(
                f"the URL holds credentials; take them out and set {USER_ENV}/{PASSWORD_ENV} "
                f"or {TOKEN_ENV} instead (a URL ends up in logs and messages)"
            )
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise ScoreError(
                f"{SCHEME}{self.url} is not a DICOMweb base URL; write it as "
                f"{SCHEME}https://host[:port]/path (for Orthanc: {SCHEME}http://127.0.0.1:8042/dicom-web)"
            )
        if self.token and (self.user or self.password):
            raise ScoreError(f"set either {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not both")
        if bool(self.user) != bool(self.password):
            raise ScoreError(f"{USER_ENV} and {PASSWORD_ENV} go together; set both or neither")
        if self.ca_bundle and not os.path.isfile(self.ca_bundle):
            raise ScoreError(f"{CA_BUNDLE_ENV}={self.ca_bundle} is not a file; name a PEM file")
        if self.timeout <= 0:
            raise ScoreError(f"the timeout must be > 0 seconds, got {self.timeout}")

    @classmethod
    def from_env(
        cls, url: str, environ: Mapping[str, str] | None = None, timeout: float = 30.0
    ) -> DicomWebSettings:
        """Settings for ``url`` with the credentials and CA bundle of the environment."""
        env = os.environ if environ is None else environ
        return cls(
            url.rstrip("/"),
            user=env.get(USER_ENV) or None,
            password=env.get(PASSWORD_ENV) or None,
            token=env.get(TOKEN_ENV) or None,
            ca_bundle=env.get(CA_BUNDLE_ENV) or None,
            timeout=timeout,
        )

    def session(self) -> requests.Session:
        """A requests session with the credentials, TLS verification and bounded retries."""
        import requests
        from urllib3.util.retry import Retry

        s = requests.Session()
        if self.token:
            s.headers["Authorization"] = f"Bearer {self.token}"
        elif self.user and self.password:
            s.auth = (self.user, self.password)
        # POST is retried too: a stored report has UIDs derived from its content's source, so
        # storing it again replaces nothing and adds nothing.
        retry = Retry(
            total=RETRIES,
            backoff_factor=0.5,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,
            raise_on_status=False,
        )
        adapter = _verifying_adapter(self.ca_bundle or True, max_retries=retry, pool_maxsize=16)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        return s

    def client(self, session: requests.Session | None = None) -> Any:
        """A dicomweb-client on ``session`` (default: a new one), retrying only through it."""
        require_pacs()
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(
            self.url, session=session or self.session(), timeout=(self.timeout, self.timeout)
        )
        client.set_http_retry_params(retry=False)  # one retry policy: the session's
        return client


def _verifying_adapter(verify: bool | str, **kw: Any) -> Any:
    """An HTTPAdapter that verifies TLS with ``verify`` on every request, whatever the
    environment says: requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override
    ``Session.verify`` (psf/requests#3829), which would drop DICOMWEB_CA_BUNDLE wherever an
    image sets them (found by the TLS test, in an environment that does)."""
    from requests.adapters import HTTPAdapter

    class VerifyingAdapter(HTTPAdapter):
        def send(self, request: Any, *args: Any, **send_kw: Any) -> Any:
            send_kw["verify"] = verify
            return super().send(request, *args, **send_kw)

    return VerifyingAdapter(**kw)


def connection_error(settings: DicomWebSettings, exc: Exception, doing: str) -> ScoreError:
    """The message for a failed request: unreachable, refused credentials, TLS, an HTTP error."""
    import requests

    where = f"the DICOMweb server at {settings.url}"
    if isinstance(exc, requests.exceptions.SSLError):
        return ScoreError(
            f"cannot {doing}: the TLS certificate of {where} could not be verified ({exc}); "
            f"if it is signed by your own CA, set {CA_BUNDLE_ENV} to that CA's PEM file"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return ScoreError(
            f"cannot {doing}: {where} did not answer within {settings.timeout:g} s; "
            "check it is up, or raise --timeout"
        )
    if isinstance(exc, requests.exceptions.ConnectionError):
        return ScoreError(
            f"cannot {doing}: {where} is unreachable (tried {RETRIES + 1} times); "
            "check the URL and that the server is running"
        )
    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            cred = (
                f"the bearer token in {TOKEN_ENV}"
                if settings.token
                else f"{USER_ENV}/{PASSWORD_ENV}"
                if settings.user
                else f"no credentials (set {USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV})"
            )
            word = "Unauthorized" if status == 401 else "Forbidden"
            return ScoreError(f"cannot {doing}: {where} answered {status} {word} to {cred}")
        return ScoreError(f"cannot {doing}: {where} answered HTTP {status} {exc.response.reason}")
    return ScoreError(f"cannot {doing} at {where}: {type(exc).__name__}: {exc}")


def _value(record: Mapping[str, Any], tag: str) -> str:
    values = record.get(tag, {}).get("Value") or [""]
    return str(values[0])


@dataclass(frozen=True)
class Instance:
    """One instance found by QIDO: its UIDs and what decides whether it is scored."""

    study: str
    series: str
    sop: str
    study_date: str = ""
    study_time: str = ""
    body_part: str = ""
    view: str = ""

    @property
    def key(self) -> str:
        return f"{self.study}/{self.series}/{self.sop}"

    @property
    def when(self) -> str:
        """``YYYYMMDDHHMMSS.FFFFFF``-like text that sorts by study date and time."""
        return f"{self.study_date}{self.study_time}"

    def skip_reason(self) -> str | None:
        """Why this is not a frontal chest film by what the PACS records, or None.

        The frontal-chest check's own header rule (:func:`pneumonia.frontal.header_reasons`,
        its one owner) applied to the QIDO answer, so that a film it would refuse after
        retrieval is not retrieved: a body part or view it positively names as another (HAND,
        LL); an attribute the PACS leaves empty, or a value the rule does not know, does not
        count against the film (the image check then judges it).
        """
        from pneumonia._decode.base import DecodeStats, HeaderFacts
        from pneumonia.frontal import header_reasons

        facts = HeaderFacts.read(
            {"BodyPartExamined": self.body_part, "ViewPosition": self.view}.get
        )
        reasons = header_reasons(DecodeStats(None, facts))
        return "; ".join(reasons) if reasons else None

    @classmethod
    def from_qido(cls, record: Mapping[str, Any]) -> Instance:
        return cls(
            _value(record, _STUDY_UID),
            _value(record, _SERIES_UID),
            _value(record, _SOP_UID),
            _value(record, _STUDY_DATE),
            _value(record, _STUDY_TIME),
            _value(record, _BODY_PART),
            _value(record, _VIEW),
        )


@dataclass(frozen=True)
class Query:
    """Which instances to find.

    Attributes:
        study_date: A DICOM date or range: ``20260101``, ``20260101-20260131``, ``20260101-``.
        study_uid: One StudyInstanceUID.
        accession: One AccessionNumber.
    """

    study_date: str | None = None
    study_uid: str | None = None
    accession: str | None = None

    def __post_init__(self) -> None:
        if self.study_date is not None and (
            not self.study_date or not _DATE_RANGE.match(self.study_date) or self.study_date == "-"
        ):
            raise ScoreError(
                f"--study-date {self.study_date!r} is not a DICOM date or range; "
                "write YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD"
            )

    def filters(self, modality: str) -> dict[str, str]:
        f = {"Modality": modality}
        if self.study_date:
            f["StudyDate"] = self.study_date
        if self.accession:
            f["AccessionNumber"] = self.accession
        return f


def find_instances(client: Any, settings: DicomWebSettings, query: Query) -> list[Instance]:
    """Every CR and DX instance matching ``query``, by study date and time, then UIDs.

    Raises:
        ScoreError: the server is unreachable, refuses the credentials or answers an error.
    """
    found: dict[str, Instance] = {}
    for modality in MODALITIES:
        try:
            records = client.search_for_instances(
                study_instance_uid=query.study_uid,
                fields=list(_FIELDS),
                search_filters=query.filters(modality),
                get_remaining=True,
            )
        except Exception as exc:
            raise connection_error(settings, exc, "search for instances (QIDO-RS)") from None
        for record in records:
            inst = Instance.from_qido(record)
            if inst.study and inst.series and inst.sop:
                found.setdefault(inst.key, inst)
    return sorted(found.values(), key=lambda i: (i.when, i.key))


def _multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` message (RFC 2387), in order.

    Sliced out of ``body`` where they lie (a film is tens of MB; splitting the whole answer
    would copy it twice). A delimiter is CRLF "--" boundary (RFC 2046 5.1.1), so the boundary
    text inside a file's bytes does not cut it; the first one may open the body without CRLF.

    Raises:
        ValueError: no boundary, a part without its blank line, or no closing delimiter.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError(f"multipart answer without a boundary (Content-Type {content_type!r})")
    delimiter = b"\r\n--" + match.group(1).encode()
    if body.startswith(delimiter[2:]):
        pos = len(delimiter) - 2
    else:
        found = body.find(delimiter)
        if found < 0:
            raise ValueError("multipart answer without its boundary")
        pos = found + len(delimiter)
    parts = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the message
        blank = body.find(b"\r\n\r\n", pos)
        if blank < 0:
            raise ValueError("multipart part without a header/body separator")
        end = body.find(delimiter, blank + 4)
        if end < 0:
            raise ValueError("multipart answer cut short (no closing delimiter)")
        parts.append(body[blank + 4 : end])
        pos = end + len(delimiter)
    return parts


@dataclass
class DicomWebSource:
    """The instances one QIDO search found; files are retrieved while the job runs.

    Args:
        settings: The connection.
        instances: From :func:`find_instances`, in scoring order.
        fetch_threads: WADO-RS requests in flight at once.
        keep_headers: Keep each retrieved file's header (no pixel data) in ``headers`` until
            :meth:`pop_header`; the reports written back need them.
        keep_files: Keep each retrieved file until :meth:`pop_file` (for heatmaps); at most
            the films in flight between retrieval and the job's hook.
        use_headers: Skip what the PACS records as not a frontal chest film (False:
            ``--ignore-headers``, retrieve and let the image check judge everything).
    """

    settings: DicomWebSettings
    instances: list[Instance]
    fetch_threads: int = 4
    keep_headers: bool = False
    keep_files: bool = False
    use_headers: bool = True
    headers: dict[str, Dataset] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    key_name: ClassVar[str] = "instance"

    def __post_init__(self) -> None:
        self._session = self.settings.session()

    @classmethod
    def open(cls, settings: DicomWebSettings, query: Query = Query(), **kw: Any) -> DicomWebSource:
        """Search the server now; the returned source holds what it found."""
        client = settings.client()
        return cls(settings, find_instances(client, settings, query), **kw)

    def iter_keys(self) -> Iterator[str]:
        return (i.key for i in self.instances)

    def _url(self, inst: Instance) -> str:
        return f"{self.settings.url}/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}"

    def retrieve(self, inst: Instance) -> bytes:
        """The instance's file as stored (WADO-RS, any transfer syntax), byte for byte.

        Raises:
            ScoreError: the server is unreachable or refuses the credentials.
            RetrieveError: it answered this instance with another error, or an unreadable answer.
        """
        import requests

        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        try:
            r = self._session.get(
                self._url(inst),
                # No gzip: Orthanc compresses an answer when asked (HttpCompressionEnabled, on by
                # default), 332 ms for a 10 MB film against 22 ms without (bench_pacs.py).
                headers={"Accept": accept, "Accept-Encoding": "identity"},
                timeout=(self.settings.timeout, self.settings.timeout),
            )
            r.raise_for_status()
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code in (401, 403):
                raise connection_error(self.settings, exc, "retrieve instances (WADO-RS)") from None
            status = exc.response.status_code if exc.response is not None else "?"
            reason = exc.response.reason if exc.response is not None else ""
            raise RetrieveError(f"WADO-RS answered HTTP {status} {reason}".strip()) from None
        except requests.RequestException as exc:
            raise connection_error(self.settings, exc, "retrieve instances (WADO-RS)") from None
        ctype = r.headers.get("Content-Type", "")
        if ctype.startswith("application/dicom"):  # a non-conforming server, one bare part
            return r.content
        try:
            parts = _multipart_parts(ctype, r.content)
        except ValueError as exc:
            raise RetrieveError(str(exc)) from None
        if len(parts) != 1:
            raise RetrieveError(f"WADO-RS answered {len(parts)} parts for one instance")
        return parts[0]

    def _skip(self, inst: Instance) -> str | None:
        return inst.skip_reason() if self.use_headers else None

    def _item(self, inst: Instance, fetched: Future[bytes] | None) -> Item:
        reason = self._skip(inst)
        if reason is not None:
            return Item(inst.key, error=f"{SKIPPED}: {reason}")
        assert fetched is not None
        try:
            data = fetched.result()
        except RetrieveError as exc:
            log.warning("cannot retrieve %s: %s", inst.key, exc)
            return Item(inst.key, error=f"{RETRIEVE_FAILED}: {exc}")
        if self.keep_headers:
            header = read_header(data)
            if header is not None:
                self.headers[inst.key] = header
        if self.keep_files:
            self.files[inst.key] = data
        return Item(inst.key, data=data)

    def items(self, skip: Container[str]) -> Iterator[Item]:
        todo = (i for i in self.instances if i.key not in skip)
        pool = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="wado")
        window: deque[tuple[Instance, Future[bytes] | None]] = deque()
        try:
            for inst in todo:
                fut = None if self._skip(inst) else pool.submit(self.retrieve, inst)
                window.append((inst, fut))
                if len(window) > 2 * self.fetch_threads:
                    yield self._item(*window.popleft())
            while window:
                yield self._item(*window.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def pop_header(self, key: str) -> Dataset | None:
        """The header kept for ``key`` (and forget it), or None."""
        return self.headers.pop(key, None)

    def pop_file(self, key: str) -> bytes | None:
        """The file kept for ``key`` (and forget it), or None."""
        return self.files.pop(key, None)


class RetrieveError(Exception):
    """The server answered one instance with an error; that instance becomes an error row."""


def read_header(data: bytes) -> Dataset | None:
    """A DICOM file's header without its pixel data, or None if it does not parse (its row
    then carries the decoder's error, and no report is written for it)."""
    from pneumonia._decode.dicom import read_header as read
    from pneumonia.preprocess import ImageError

    try:
        header: Dataset = read(data)
    except ImageError:
        return None
    return header


def parse_source(text: str) -> str | None:
    """The base URL of a ``dicomweb:`` input, or None if ``text`` is not one."""
    return text[len(SCHEME) :] if text.startswith(SCHEME) else None
