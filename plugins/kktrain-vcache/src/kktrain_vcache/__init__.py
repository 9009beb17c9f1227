"""vcache: tune the run config to the detected hardware, from the matching hardware profile.

Named after the case it was first written for (AMD 3D V-Cache: +32 batch, 8 workers, prefetch 6 on
a 5600X3D), it applies whichever profile matches: Zen, Intel, AMX, Apple, NVIDIA by architecture.
At ``on_hw_detect`` it matches the detected hardware against the profiles (``docs/hardware.md``)
and returns concrete config updates; the core skips any key the user set and logs each change.
It also adds the ``kktrain hw-report`` command (through ``register_commands``).

    kktrain run --plugin vcache                          # apply the matching profile
    kktrain run --plugin vcache -o vcache.profile=zen3_vcache   # force one by name
    kktrain run --plugin vcache -o vcache.dry_run=true   # only log what would change
    kktrain hw-report                                    # what was detected, what would change
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kktrain import HardwareInfo, PluginOptions, RunConfig, hookimpl
from kktrain_vcache.profiles import Plan, load_profiles, plan, profile_by_name, report

if TYPE_CHECKING:
    import click

    from kktrain import Trainer

__all__ = ["VCachePlugin"]


class VCachePlugin:
    """Tune batch size, data loading, threads, AMP and compile options to the detected hardware."""

    class Options(PluginOptions):
        """``-o vcache.KEY=VALUE`` / ``[plugins.vcache]``."""

        profile: str | None = None
        """Use this profile (by name) instead of the best match (a GPU profile: the GPU one)."""
        profiles_dir: list[str] = []
        """Extra profile directories, loaded after ``$KKTRAIN_HW_PROFILES``; same name replaces."""
        dry_run: bool = False
        """Log what would change and change nothing."""

    def __init__(self, options: VCachePlugin.Options | None = None) -> None:
        self.options = options or self.Options()
        # Load and check now, so a bad profile file or an unknown forced name fails at set-up.
        self.profiles = load_profiles(self.options.profiles_dir)
        if self.options.profile is not None:
            profile_by_name(self.profiles, self.options.profile)
        self.plan: Plan | None = None

    @staticmethod
    @hookimpl
    def register_commands(cli: click.Group) -> None:
        """``kktrain hw-report``."""
        import click

        @cli.command("hw-report")
        @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
        @click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto",
                      help="Device the run would use.")
        @click.option("--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path),
                      help="Extra directory of hardware profiles (repeatable; also KKTRAIN_HW_PROFILES).")
        def hw_report(as_json: bool, device: str, profiles_dirs: tuple[Path, ...]) -> None:
            """What hardware was detected, which profile applies and what it would change."""
            report(as_json=as_json, device=device, extra_dirs=list(profiles_dirs))

    @hookimpl
    def on_hw_detect(self, hw: HardwareInfo, config: RunConfig, user_set: frozenset[str]) -> dict[str, Any] | None:
        """Return the matched profiles' recommendations as concrete dotted config updates."""
        self.plan = plan(hw, config, self.profiles, user_set=user_set, force=self.options.profile)
        if self.options.dry_run or not self.plan.updates:
            return None
        # The core applies these (skipping what the user set) and logs each change it makes.
        return dict(self.plan.updates)

    @hookimpl
    def on_train_start(self, trainer: Trainer) -> None:
        """Log the matched profiles and (in a dry run) what they would have changed."""
        if self.plan is None:
            return
        match = self.plan.match
        trainer.log_event("vcache_profile", cpu=self.plan.hw.cpu.model_name, device=match.device_kind,
                          profiles=[p.name for p in match.profiles], dry_run=self.options.dry_run)
        if self.options.dry_run:
            for change in self.plan.changes:
                trainer.log_event("vcache_would_set", key=change.key, old=change.old, new=change.new,
                                  profile=change.source)

    @hookimpl
    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """``summary["vcache"]``: the matched profiles and the recommended changes."""
        if self.plan is None:
            return
        summary["vcache"] = {
            "profiles": ", ".join(p.name for p in self.plan.match.profiles) or "none",
            "dry_run": self.options.dry_run,
            "changes": [{"key": c.key, "old": c.old, "new": c.new, "profile": c.source} for c in self.plan.changes],
        }
