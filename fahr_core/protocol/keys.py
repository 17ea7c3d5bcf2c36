"""Every key the server and a site both spell, each named once.

A key spelled at both ends is a contract: if one end renames it, the other reads nothing, and
Flower's records answer a missing key with a KeyError in another process, or a `.get` default that
silently changes behaviour. So the server, the site, the researcher CLI and the process launcher
import these names and never write the strings themselves; `tests/test_protocol_keys.py` parses
every module there and fails on a string equal to one of these values. The model spec's keys live
beside its encoding in `fahr_core.protocol.spec`; the evaluation metrics beside theirs in
`fahr_core.protocol.wire`; both are checked the same way.
"""

from __future__ import annotations

# --- records of a Message's RecordDict --------------------------------------------------------
CONFIG = "config"  # ConfigRecord, server -> site: the round config below (and the model spec)
ARRAYS = "arrays"  # ArrayRecord: model tensors, both ways
METRICS = "metrics"  # MetricRecord, site -> server: scalars on the outbound allow-list
SITE = "site"  # ConfigRecord, site -> server: the name the site declares ...
SITE_NAME = "name"  # ... under this one key
SECAGG = "secagg"  # ArrayRecord, both ways: secure aggregation's protocol fields (below)
AGE_MODEL = "age-model"  # ArrayRecord of the final evaluate message: the age model file's bytes

# --- the round config (CONFIG) ------------------------------------------------------------------
FAHR_VERSION = "fahr-version"  # release + code fingerprint; a site refuses any other
NUM_ROUNDS = "num-rounds"  # rounds planned: a site spreads its budget over them
SERVER_ROUND = "server-round"  # the federation's round (Flower sets it; secure aggregation resends it)
SECURE_AGGREGATION = "secure-aggregation"  # true: a site sends keys and masked updates, no weights
SPEND_ON_RECORD = "spend-on-record"  # JSON {site: [rounds, epsilon]}: the server's record of each spend
AGE_MODEL_SHA256 = "age-model-sha256"  # the digest of the AGE_MODEL file, in the final evaluate config

# --- secure aggregation (fahr_core.privacy.secagg; stages in fahr_server/fahr_client.secagg) --------
# the stages after training, sent as Flower train actions `train.<stage>`
SECAGG_SHARE, SECAGG_MASK, SECAGG_UNMASK = "secagg_share", "secagg_mask", "secagg_unmask"
# config entries of the stage messages
SECAGG_THRESHOLD = "secagg-threshold"  # shares needed to reconstruct a secret
SECAGG_TOTAL_EXAMPLES = "secagg-total-examples"  # N: each site weights its update by n / N
SECAGG_CLIP = "secagg-clip"  # the quantiser's clip ...
SECAGG_LEVELS = "secagg-levels"  # ... and its integer levels per clip
SECAGG_SURVIVORS = "secagg-survivors"  # node ids that sent a masked update
SECAGG_DROPPED = "secagg-dropped"  # node ids that shared keys but sent none
# array names in SECAGG; the per-node ones are `<prefix>/<node id>` (secagg.blobs_to_arrays)
ENC_PK = "enc-pk"  # a site's X25519 public key for encrypting shares
MASK_PK = "mask-pk"  # a site's X25519 public key for pairwise masks
SHARE_TO = "share-to"  # encrypted shares a site sends, by recipient
SHARE_FROM = "share-from"  # the same, forwarded to the recipient, by sender
MASKED = "masked"  # a site's masked, quantised update
SEED_SHARE = "seed-share"  # a survivor's share of a self-mask seed, by owner
KEY_SHARE = "key-share"  # a dropped site's share of its mask key, by owner

# --- training metrics (METRICS; each is on fahr_core.protocol.outbound.ALLOW_LIST) -------------------
NUM_EXAMPLES = "num-examples"  # training patients: the FedAvg weight (Flower's default weighting key)
EPSILON = "epsilon"
DELTA = "delta"
EPSILON_BUDGET = "epsilon-budget"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
BYTES_SENT = "bytes-sent"
SECAGG_CLIPPED = "secagg-clipped"

# --- the SuperNode's node config (`fahr-client start` -> the ClientApp) -----------------------
NODE_SITE = "site"  # the site's name, for Flower's own logs
SITE_CONFIG = "site-config"  # the path of the site's site.toml: all the ClientApp knows of its site

# --- the run config (`fahr-server run` -> the ServerApp, in the generated Flower App) ---------------
CONFIG_PATH = "config-path"  # the absolute path of the server config
RESUME = "resume"  # true: continue the run recorded in the workdir's state.json
