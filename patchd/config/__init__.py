"""Loading patchd's TOML config: file discovery, drop-in merge, validation, Settings."""

from patchd.config.errors import ConfigError, ConfigIssue
from patchd.config.files import DEFAULT_CONFIG, DEFAULT_DROPIN_DIR
from patchd.config.settings import DaemonSettings, Group, Settings, load_settings
from patchd.plugins import BackendSpec

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_DROPIN_DIR",
    "BackendSpec",
    "ConfigError",
    "ConfigIssue",
    "DaemonSettings",
    "Group",
    "Settings",
    "load_settings",
]
