"""One typed configuration object per role, read from TOML and validated once at the edge.

Everything inside fahr takes these objects; only this module knows the file format, so a bad
file fails here with a message that names the file and the key.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fahr_core.io import atomic_write_text
from fahr_core.models.archs import ARCHS, FAHR_FACE_ARCH
from fahr_core.survival.losses import require_dp_valid
from fahr_core.workdir import SITE_WORKDIR, ServerWorkdir, SiteWorkdir

SITE_CONFIG_FILE = "site.toml"  # a site's config, by default in the site's folder beside cohort.csv


class ConfigError(ValueError):
    """A configuration file is missing, unreadable, or has a bad key or value."""


@dataclass(frozen=True)
class ModelConfig:
    """Which ViT to build: `vit_base` is FAHR-Face's ViT-B/16; `vit_small`/`vit_tiny` suit CPUs."""

    arch: str = FAHR_FACE_ARCH
    img_size: int = 112
    encoder_checkpoint: str = ""  # safetensors file of MAE-pretrained encoder weights; "" = random init
    # the federation's one age model (fahr_core.age.model format), sent to every site with the final
    # evaluation for the face-age deviation analysis; "" = sites report FAD as not computed
    age_checkpoint: str = ""
    # an age model (fahr_core.age.model format) to start the survival model from: its encoder, and a
    # risk head folded from its age head, so round 0's risk is init_log_hr_per_year x (predicted age -
    # its training mean) (fahr_core.models.initial); "" = encoder_checkpoint and a zero risk head.
    # The demo names its age model in both fields.
    init_age_model: str = ""
    # the prior log hazard ratio per year of predicted age: adult mortality doubles about every 8 years
    # (Gompertz), a fact of demography, not of any site; only training speed depends on it, not ranking
    init_log_hr_per_year: float = math.log(2) / 8
    n_intervals: int = 10  # follow-up intervals of the discrete-time hazard head
    horizon_years: float = 10.0  # follow-up beyond this is censored at it
    # what the sites train and send (fahr_core.models.finetune): "full", "head", "last:N" (head and the
    # last N blocks), "lora" (head and LoRA adapters) or "ffa-lora" (head and LoRA's B, A frozen)
    finetune: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "qkv,proj"  # comma-separated Linear layers of each block: qkv, proj, fc1, fc2
    lora_seed: int = 0  # the adapters' shared A init: model init, identical at every site (not DP noise)
    wire_dtype: str = "float32"  # trainable tensors travel as float32, float16 or bfloat16
    base_sha256: str = ""  # the frozen base's hash; the server computes it, a config file never sets it


FINETUNE_MODES = ("full", "head", "lora", "ffa-lora")  # and "last:N"
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
CLIPPING_METHODS = ("hooks", "ghost")  # Opacus' per-sample gradients, or ghost clipping (train/local.py)


def finetune_problem(m: ModelConfig) -> str | None:
    """Why the fine-tuning settings are invalid (naming the key), or None."""
    mode = m.finetune
    last = mode.startswith("last:") and mode[5:].isdigit() and int(mode[5:]) >= 1
    if mode not in FINETUNE_MODES and not last:
        return f"[model].finetune must be one of {', '.join(FINETUNE_MODES)}, last:N (N >= 1), not {mode!r}"
    targets = m.lora_targets.split(",")
    if mode.endswith("lora") and (not m.lora_targets or any(t not in LORA_TARGETS for t in targets)):
        return f"[model].lora_targets must be a comma-separated subset of {','.join(LORA_TARGETS)}"
    if m.lora_rank < 1 or m.lora_alpha <= 0:
        return "[model].lora_rank must be >= 1 and lora_alpha > 0"
    if m.wire_dtype not in WIRE_DTYPES:
        return f"[model].wire_dtype must be one of {', '.join(WIRE_DTYPES)}, not {m.wire_dtype!r}"
    return None


@dataclass(frozen=True)
class PrivacyConfig:
    """The site's DP budget for the whole federation (all rounds, all runs) and its clipping norm."""

    epsilon: float = 8.0
    delta: float = 0.0  # 0 = min(1e-5, 0.001 / n) at the first spend, then fixed (privacy/ledger.py)
    max_grad_norm: float = 1.0
    # held-out evaluations the site answers per federation run: the site decides, not the server, since
    # every evaluation releases non-DP aggregates of its held-out patients (docs/privacy.md)
    evaluations_per_run: int = 1


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32  # Poisson sample rate 1 / ceil(n / batch_size) (privacy/dpsgd.py)
    lr: float = 1e-3
    # lr of the risk bias, which shifts every patient's log hazard alike and ranks no one: it must
    # reach the site's own hazard level within a round or two (fahr_core.train.local._optimizer)
    level_lr: float = 0.05
    weight_decay: float = 0.0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    loss: str = "discrete_hazard"  # sites train under DP, so only per-patient losses are accepted
    clipping: str = "hooks"  # DP per-patient clipping: "hooks" or "ghost" (same update; train/local.py)


@dataclass(frozen=True)
class AlignmentConfig:
    """Which face detector aligns the site's photos (see docs/alignment.md)."""

    detector: str = "blazeface"  # "blazeface" (bundled MediaPipe models) or "insightface" (SCRFD pack)
    model_dir: Path = Path()  # insightface: the folder holding det_10g.onnx (buffalo_l); never downloaded
    workers: int = 0  # alignment processes; 0 = one per CPU


@dataclass(frozen=True)
class SecurityConfig:
    """Server side of TLS and site authentication (`fahr certs` makes these files).

    site_keys are the registered sites' public keys: a SuperNode whose key is not among them is
    refused by the SuperLink.
    """

    ca_cert: Path = Path()
    server_cert: Path = Path()
    server_key: Path = Path()
    site_keys: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ConnectionConfig:
    """How a site reaches the server: its address, the CA to verify it with, the site's own key."""

    superlink: str = "127.0.0.1:8000"
    root_certificates: Path = Path()
    auth_key: Path = Path()


@dataclass(frozen=True)
class SiteConfig:
    """A hospital site: where its cohort lives, how it is split, and what it may spend."""

    name: str
    data: Path  # folder holding cohort.csv and the photos it names
    workdir: Path  # site state: privacy ledger, caches, received weights, reports
    split_seed: int = 0
    test_fraction: float = 0.3
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    @property
    def paths(self) -> SiteWorkdir:
        """Every file the site keeps in its workdir."""
        return SiteWorkdir(self.workdir)


@dataclass(frozen=True)
class ServerConfig:
    """The federation: rounds, how many sites must take part, the model every site trains."""

    rounds: int = 3
    min_sites: int = 2
    fraction_train: float = 1.0
    address: str = "127.0.0.1"
    port: int = 8000  # the SuperLink's one HTTP port (Fleet, Control and Runtime APIs)
    workdir: Path = Path("fahr-server-run")
    round_timeout_s: float = 1800.0
    join_timeout_s: float = (
        600.0  # a round fails, with a message, if fewer than min_sites are connected by then
    )
    # the server learns only the sum of the sites' updates (docs/security.md: off by default, and why)
    secure_aggregation: bool = False
    secagg_clip: float = 1.0  # per-coordinate range of each site's example-weighted update under it
    # how screened updates are combined: "fedavg" (weighted mean), or a robust rule from Flower against
    # poisoned updates that pass screening: "median", "trimmed_mean" (trim_fraction cut at each end),
    # "krum" (the update closest to its neighbours, tolerating krum_malicious sites)
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    krum_malicious: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    security: SecurityConfig | None = None  # None: no [security] table; only --insecure runs

    @property
    def paths(self) -> ServerWorkdir:
        """Every file the federation keeps in its workdir."""
        return ServerWorkdir(self.workdir)


def is_set(path: Path) -> bool:
    """Path fields default to Path() ("."), meaning: not configured."""
    return str(path) not in ("", ".")


def _paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve every Path value (and tuple of paths) relative to the config file's folder."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Path):
            value = (base / value).resolve() if is_set(value) else value
        elif isinstance(value, list):
            value = tuple((base / v).resolve() for v in value)
        out[key] = value
    return out


def _section(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from table `raw`, naming the offending key on any error."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        default = known[name].default
        if isinstance(default, bool) or default is None or isinstance(value, dict):
            values[name] = value
            continue
        want = Path if isinstance(default, Path) else type(default)
        try:
            if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[name] = float(value)
            elif want is Path and isinstance(value, str):
                values[name] = Path(value)
            elif want is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
                values[name] = [Path(v) for v in value]
            elif isinstance(value, want) and not isinstance(value, bool):
                values[name] = value
            else:
                raise TypeError
        except TypeError:
            raise ConfigError(
                f"{where}.{name}: expected {want.__name__}, got {type(value).__name__} {value!r}"
            ) from None
    return values


def _is_listen_address(address: object) -> bool:
    """A host name or IP address, no port: a colon only inside an IPv6 address, written bare
    (Flower's SuperLink adds the brackets itself; `[::1]` would reach it as `[[::1]]`)."""
    if not isinstance(address, str) or not address or any(c.isspace() for c in address):
        return False
    if ":" not in address:
        return "[" not in address
    try:
        return ipaddress.ip_address(address).version == 6
    except ValueError:
        return False


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


SITE_TABLES = ("site", "privacy", "train", "connection", "alignment")
# Above this total epsilon, DP's guarantee says little (a factor e^10 ~ 22,000 on any outcome's
# odds); accepted, with a warning, because the site's own governance sets its budget.
EPSILON_WARN_ABOVE = 10.0
_SUPERLINK = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def _finite(value: float, low: float, where: str, what: str, inclusive: bool = False) -> None:
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    _check(ok, f"{where} must be a finite number {'>=' if inclusive else '>'} {low:g}{what}, not {value!r}")


def _check_site_values(cfg: SiteConfig, source: str) -> None:
    """What each setting means, not only its type: a value that voids DP or cannot train is refused.

    delta's bound, below 1/n of the training split, needs the cohort: `check_site` applies it.
    """
    p, t, a = cfg.privacy, cfg.train, cfg.alignment
    _finite(p.epsilon, 0, f"{source}: [privacy].epsilon", " (the site's total budget)")
    _check(
        math.isfinite(p.delta) and 0.0 <= p.delta < 1.0,
        f"{source}: [privacy].delta must be 0 (automatic) or below 1/n of the training split, "
        f"not {p.delta!r}",
    )
    _finite(p.max_grad_norm, 0, f"{source}: [privacy].max_grad_norm", " (the clipping bound)")
    _check(p.evaluations_per_run >= 0, f"{source}: [privacy].evaluations_per_run must be >= 0")
    _finite(t.lr, 0, f"{source}: [train].lr", "")
    _finite(t.level_lr, 0, f"{source}: [train].level_lr", "")
    _finite(t.weight_decay, 0, f"{source}: [train].weight_decay", "", inclusive=True)
    _check(t.threads >= 0, f"{source}: [train].threads must be >= 0 (0 = torch's default), not {t.threads}")
    _check(a.workers >= 0, f"{source}: [alignment].workers must be >= 0 (0 = one per CPU), not {a.workers}")
    _check(
        a.detector != "insightface" or is_set(a.model_dir),
        f"{source}: [alignment].model_dir must name the folder holding det_10g.onnx when "
        "detector = 'insightface' (docs/alignment.md)",
    )
    m = _SUPERLINK.fullmatch(cfg.connection.superlink)
    _check(
        m is not None and 1 <= int(m.group(2)) <= 65535,
        f"{source}: [connection].superlink must be host:port (e.g. fahr.example.org:8000), "
        f"not {cfg.connection.superlink!r}",
    )


def site_config_warnings(cfg: SiteConfig) -> list[str]:
    """Settings that are valid but that a site should know it chose."""
    if cfg.privacy.epsilon > EPSILON_WARN_ABOVE:
        return [
            f"[privacy].epsilon = {cfg.privacy.epsilon:g} is above {EPSILON_WARN_ABOVE:g}: differential "
            "privacy then guarantees little (docs/site-data.md)"
        ]
    return []


def site_config_from_dict(raw: dict[str, Any], source: str, base: Path) -> SiteConfig:
    """Validate a parsed site TOML. Relative paths are taken relative to `base` (the file's folder)."""
    for table in SITE_TABLES:
        _check(
            isinstance(raw.get(table, {}), dict),
            f"{source}: '{table}' must be a table ([{table}] on its own line), not {raw.get(table)!r}",
        )
    site = dict(raw.get("site", {}))
    _check("name" in site, f"{source}: [site] needs 'name'")
    _check("data" in site, f"{source}: [site] needs 'data' (the folder with cohort.csv)")
    site.setdefault("workdir", str(Path(site["data"]) / SITE_WORKDIR))
    defaults = {"split_seed": 0, "test_fraction": 0.3}
    for key in ("name", "data", "workdir"):
        _check(isinstance(site[key], str) and site[key], f"{source}: [site].{key} must be a non-empty string")
    extra = sorted(set(site) - {"name", "data", "workdir", *defaults})
    _check(not extra, f"{source}: [site] unknown key(s) {', '.join(extra)}")
    seed = site.get("split_seed", 0)
    _check(
        isinstance(seed, int) and not isinstance(seed, bool),
        f"{source}: [site].split_seed must be a whole number, not {seed!r}",
    )
    fraction = site.get("test_fraction", 0.3)
    _check(
        isinstance(fraction, (int, float)) and not isinstance(fraction, bool),
        f"{source}: [site].test_fraction must be a number in (0, 1), not {fraction!r}",
    )
    privacy = PrivacyConfig(**_section(PrivacyConfig, raw.get("privacy", {}), f"{source} [privacy]"))
    train = TrainConfig(**_section(TrainConfig, raw.get("train", {}), f"{source} [train]"))
    connection = ConnectionConfig(
        **_paths(_section(ConnectionConfig, raw.get("connection", {}), f"{source} [connection]"), base)
    )
    alignment = AlignmentConfig(
        **_paths(_section(AlignmentConfig, raw.get("alignment", {}), f"{source} [alignment]"), base)
    )
    _check(
        alignment.detector in ("blazeface", "insightface"),
        f"{source}: [alignment].detector must be 'blazeface' or 'insightface'",
    )
    unknown_tables = sorted(set(raw) - set(SITE_TABLES))
    _check(not unknown_tables, f"{source}: unknown table(s) {', '.join(unknown_tables)}")
    cfg = SiteConfig(
        name=site["name"],
        data=(base / site["data"]).resolve(),
        workdir=(base / site["workdir"]).resolve(),
        split_seed=int(site.get("split_seed", 0)),
        test_fraction=float(site.get("test_fraction", 0.3)),
        privacy=privacy,
        train=train,
        connection=connection,
        alignment=alignment,
    )
    _check(0.0 < cfg.test_fraction < 1.0, f"{source}: [site].test_fraction must be in (0, 1)")
    _check(cfg.train.local_epochs >= 1, f"{source}: [train].local_epochs must be >= 1")
    _check(cfg.train.batch_size >= 1, f"{source}: [train].batch_size must be >= 1")
    _check(
        cfg.train.clipping in CLIPPING_METHODS,
        f"{source}: [train].clipping is {cfg.train.clipping!r}; use one of {', '.join(CLIPPING_METHODS)}",
    )
    _check_site_values(cfg, source)
    try:
        require_dp_valid(cfg.train.loss)
    except ValueError as e:
        raise ConfigError(f"{source}: [train].loss: {e}") from None
    return cfg


def server_config_from_dict(raw: dict[str, Any], source: str, base: Path) -> ServerConfig:
    fed = dict(raw.get("federation", {}))
    model = ModelConfig(**_section(ModelConfig, raw.get("model", {}), f"{source} [model]"))
    for key in ("encoder_checkpoint", "age_checkpoint", "init_age_model"):  # relative to the config file
        if getattr(model, key):
            path = (base / getattr(model, key)).resolve()
            _check(path.is_file(), f"{source}: [model].{key} {path} not found")
            resolved: dict[str, Any] = {key: str(path)}  # the field is named at run time
            model = replace(model, **resolved)
    values = _section(ServerConfig, fed, f"{source} [federation]")
    if "workdir" in values:
        values["workdir"] = (base / values["workdir"]).resolve()
    security = None
    if "security" in raw:
        sec = _paths(_section(SecurityConfig, raw["security"], f"{source} [security]"), base)
        security = SecurityConfig(**sec)
        for key in ("ca_cert", "server_cert", "server_key"):
            _check(is_set(getattr(security, key)), f"{source}: [security].{key} is required")
    unknown_tables = sorted(set(raw) - {"federation", "model", "security"})
    _check(not unknown_tables, f"{source}: unknown table(s) {', '.join(unknown_tables)}")
    cfg = ServerConfig(**values, model=model, security=security)
    _check(cfg.rounds >= 1, f"{source}: [federation].rounds must be >= 1")
    _check(
        _is_listen_address(cfg.address),
        f"{source}: [federation].address must be a host name or IP address to listen on, without a "
        f"port or brackets (0.0.0.0 or :: for every interface; the port is [federation].port), "
        f"not {cfg.address!r}",
    )
    _check(
        isinstance(cfg.port, int) and not isinstance(cfg.port, bool) and 1 <= cfg.port <= 65535,
        f"{source}: [federation].port must be a whole number in 1..65535, not {cfg.port!r}",
    )
    _check(cfg.min_sites >= 1, f"{source}: [federation].min_sites must be >= 1")
    _check(0 < cfg.fraction_train <= 1, f"{source}: [federation].fraction_train must be in (0, 1]")
    _check(
        isinstance(cfg.secure_aggregation, bool),
        f"{source}: [federation].secure_aggregation must be true or false",
    )
    _check(
        not cfg.secure_aggregation or cfg.min_sites >= 2,
        f"{source}: [federation].secure_aggregation needs min_sites >= 2 (the sum of one site is its update)",
    )
    _check(cfg.secagg_clip > 0, f"{source}: [federation].secagg_clip must be > 0")
    _check(
        cfg.aggregation in AGGREGATIONS,
        f"{source}: [federation].aggregation must be one of {', '.join(AGGREGATIONS)}, "
        f"not {cfg.aggregation!r}",
    )
    _check(
        cfg.aggregation == "fedavg" or not cfg.secure_aggregation,
        f"{source}: [federation].aggregation = {cfg.aggregation!r} needs each site's update, which secure "
        "aggregation hides; use 'fedavg' with secure_aggregation",
    )
    _check(0 <= cfg.trim_fraction < 0.5, f"{source}: [federation].trim_fraction must be in [0, 0.5)")
    _check(cfg.krum_malicious >= 0, f"{source}: [federation].krum_malicious must be >= 0")
    _check(cfg.model.arch in ARCHS, f"{source}: [model].arch must be one of {', '.join(ARCHS)}")
    _check(cfg.model.img_size % 16 == 0, f"{source}: [model].img_size must be a multiple of 16")
    _check(cfg.model.n_intervals >= 2, f"{source}: [model].n_intervals must be >= 2")
    _check(not cfg.model.base_sha256, f"{source}: [model].base_sha256 is computed by the server, not set")
    _check(
        not (cfg.model.init_age_model and cfg.model.encoder_checkpoint),
        f"{source}: [model].init_age_model and [model].encoder_checkpoint both name an encoder; the "
        "survival model starts from the age model's, so leave encoder_checkpoint out",
    )
    _finite(
        cfg.model.init_log_hr_per_year, 0, f"{source}: [model].init_log_hr_per_year", " (per year of age)"
    )
    problem = finetune_problem(cfg.model)
    _check(problem is None, f"{source}: {problem}")
    return cfg


AGGREGATIONS = ("fedavg", "median", "trimmed_mean", "krum")


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file; UTF-8 with or without a byte-order mark (Windows editors add one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; --config takes the TOML file itself") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: is UTF-16; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text; save the file as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_site_config(path: Path) -> SiteConfig:
    path = Path(path)
    return site_config_from_dict(_read_toml(path), str(path), path.parent)


def load_server_config(path: Path) -> ServerConfig:
    path = Path(path)
    return server_config_from_dict(_read_toml(path), str(path), path.parent)


def toml_value(v: Any) -> str:
    """A TOML literal of `v`; a string as a basic string, with every character TOML forbids raw in
    one (backslash, quote, control characters: a path may hold a tab or a newline) escaped."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    text = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text) + '"'


def model_table(spec: ModelConfig) -> str:
    """`spec` as a server config's `[model]` table: `arch` and every key that differs from the default
    (paths as given), so the table says what is chosen and nothing the defaults already say."""
    default = ModelConfig()
    keys = [f.name for f in fields(spec) if f.name != "base_sha256"]
    chosen = [k for k in keys if k == "arch" or getattr(spec, k) != getattr(default, k)]
    return "\n".join(["[model]", *(f"{k} = {toml_value(getattr(spec, k))}" for k in chosen)]) + "\n"


def dump_site_config(cfg: SiteConfig, path: Path) -> None:
    """Write `cfg` as TOML (atomically), with paths as given; used by `fahr cohort simulate` and the demo."""
    lines = ["[site]"]
    for key in ("name", "data", "workdir", "split_seed", "test_fraction"):
        lines.append(f"{key} = {toml_value(getattr(cfg, key))}")
    for table, obj in (
        ("privacy", cfg.privacy),
        ("train", cfg.train),
        ("connection", cfg.connection),
        ("alignment", cfg.alignment),
    ):
        lines += ["", f"[{table}]"]
        for key, value in asdict(obj).items():  # an unset path is written as "" (not ".")
            lines.append(
                f"{key} = {toml_value('' if isinstance(value, Path) and not is_set(value) else value)}"
            )
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
