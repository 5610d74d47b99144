"""Core: the Transform abstraction, composition and parameter selection rules."""
from jaxcompress.core.paths import leaf_names as leaf_names
from jaxcompress.core.paths import path_name as path_name
from jaxcompress.core.rules import DEFAULT_RULES as DEFAULT_RULES
from jaxcompress.core.rules import LeafDecision as LeafDecision
from jaxcompress.core.rules import explain as explain
from jaxcompress.core.rules import format_decisions as format_decisions
from jaxcompress.core.rules import select as select
from jaxcompress.core.transform import Transform as Transform
from jaxcompress.core.transform import UpdateInfo as UpdateInfo
from jaxcompress.core.transform import chain as chain
from jaxcompress.core.transform import identity as identity
from jaxcompress.core.transform import intercepted as intercepted
from jaxcompress.core.transform import update_info as update_info
