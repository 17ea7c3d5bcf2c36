"""`fahr`: the central research tools: simulate cohorts, and run the whole demo on one machine."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from fahr_core.cohort import demo_faces_dir, load_labelled_faces
from fahr_core.cohort.simulate import SimulationParams, simulate_sites
from fahr_core.config import (
    SITE_CONFIG_FILE,
    SiteConfig,
    dump_site_config,
    load_site_config,
    model_table,
)
from fahr_core.io import atomic_write_text
from fahr_core.models import shipped
from fahr_core.workdir import SITE_WORKDIR, ServerWorkdir
from fahr_ops.certs import create_server_tls, create_site_keys, renew_server_tls
from fahr_ops.cli import new_app
from fahr_research.age import app as age_app
from fahr_research.local import demo_server_toml, local_credentials, run_local_federation
from fahr_research.options import AlignmentWorkers, Threads, set_threads
from fahr_research.pretrain import export_encoder_command, pretrain_command, shards_app

app = new_app("fahr research tools.")
cohort_app = typer.Typer(
    help="Cohorts: simulate semi-synthetic sites from labelled faces.", no_args_is_help=True
)
app.add_typer(cohort_app, name="cohort")
app.command("pretrain")(pretrain_command)
app.command("export-encoder")(export_encoder_command)
app.add_typer(age_app, name="age")
app.add_typer(shards_app, name="shards")
certs_app = typer.Typer(
    help="Certificates: the federation's CA, server TLS, site keys.", no_args_is_help=True
)
app.add_typer(certs_app, name="certs")
models_app = typer.Typer(
    help="Models: where the shipped ones are, and rebuilding them from labelled faces.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


@certs_app.command("init")
def certs_init(
    out: Annotated[Path, typer.Option(help="folder for ca.crt, ca.key, server.crt, server.key")],
    host: Annotated[list[str], typer.Option(help="server DNS name or IP (repeatable)")] = ["127.0.0.1"],  # noqa: B006
    force: Annotated[
        bool, typer.Option(help="replace existing files (every site then needs the new ca.crt)")
    ] = False,
) -> None:
    """Create the federation's CA and the server's TLS certificate (keep ca.key offline)."""
    try:
        tls = create_server_tls(out, host, force=force)
    except (ValueError, OSError) as e:
        raise _refused(e) from None
    typer.echo(f"wrote {tls.ca_cert} (give to every site), {tls.cert} and {tls.key} (server only)")


@certs_app.command("renew")
def certs_renew(
    out: Annotated[Path, typer.Option(help="the folder `fahr certs init` wrote (ca.key must be there)")],
    days: Annotated[int, typer.Option(help="validity of the new server certificate, in days")] = 825,
) -> None:
    """Renew the server's TLS certificate: same key, names and CA; restart fahr-server to use it."""
    try:
        renewal = renew_server_tls(out, days)
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {renewal.cert}, valid until {renewal.valid_until:%Y-%m-%d}; restart fahr-server")
    if renewal.ca_reissued:
        typer.echo(
            f"the CA certificate expired first and was re-issued (same key): give the new "
            f"{Path(out) / 'ca.crt'} to every site"
        )


@certs_app.command("site")
def certs_site(
    out: Annotated[Path, typer.Option(help="folder for <site>.key and <site>.pub")],
    site: Annotated[str, typer.Option(help="site name")],
    force: Annotated[
        bool, typer.Option(help="replace an existing key pair (the server must register the new .pub)")
    ] = False,
) -> None:
    """Create a site's key pair: the .key stays at the site, the .pub goes to the server operator."""
    try:
        private, public = create_site_keys(out, site, force=force)
    except (ValueError, OSError) as e:
        raise _refused(e) from None
    typer.echo(
        f"wrote {private} (stays at the site) and {public} (register at the server: [security].site_keys)"
    )


@models_app.command("build")
def models_build(
    data: Annotated[Path, typer.Option(help="labelled faces, e.g. ../shared/data/utkface (labels.csv)")],
    out: Annotated[Path, typer.Option(help="build folder (resumable: re-run the same command to continue)")],
    recipe: Annotated[
        Path | None, typer.Option(help="JSON of Recipe fields to override (default: the measured recipe)")
    ] = None,
    aligned: Annotated[Path | None, typer.Option(help="alignment cache (default OUT/aligned)")] = None,
    workers: AlignmentWorkers = 0,
    threads: Threads = 0,
    only: Annotated[
        str,
        typer.Option(
            help="stages to run, comma-separated (default: the shipped models' stages; age-random, "
            "the random-init comparison, runs when named: docs/models.md)"
        ),
    ] = "",
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            max=2,
            help="2: MAE on two processes and the warm-start arms split in two; an age stage on twice "
            "the threads, or, with both to run, age-random in a second process beside age (2 cores)",
        ),
    ] = 1,
) -> None:
    """MAE encoder, age model and survival warm start; with --only age-random, the age model's
    random-init twin (docs/models.md)."""
    from fahr_research.models import DEFAULT_STAGES, ModelBuild, recipe_from_json

    set_threads(threads)
    try:
        r = recipe_from_json(recipe)
        build = ModelBuild(data, out, r, aligned, workers or None, echo=lambda s: typer.echo(s), jobs=jobs)
        build.run(only.split(",") if only else DEFAULT_STAGES)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@models_app.command("shipped")
def models_shipped() -> None:
    """Where the shipped models are, and the server.toml model table the demo starts from."""
    typer.echo(
        "# fahr's shipped models (docs/models.md; a model card, .md, beside each):\n"
        f"#   age model:               {shipped.AGE_MODEL}\n"
        f"#   MAE encoder:             {shipped.MAE_ENCODER}\n"
        f"#   the age model's encoder: {shipped.AGE_ENCODER}\n"
        "# the survival model's start that `fahr models build` chose and the demo uses, for a server.toml:\n"
        + model_table(shipped.start_spec()),
        nl=False,
    )


def _refused(e: Exception) -> typer.Exit:
    """An operator error as one line on stderr (FileExistsError, a bad name, an unwritable folder)."""
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None


@cohort_app.command("simulate")
def simulate(
    out: Annotated[Path, typer.Option(help="folder to write one site folder per site into")],
    faces: Annotated[
        Path | None, typer.Option(help="UTKFace-layout folder (labels.csv); default: bundled")
    ] = None,
    sizes: Annotated[str, typer.Option(help="patients per site, comma-separated")] = "120,90,60",
    mean_ages: Annotated[str, typer.Option(help="centre of each site's age mix")] = "42,55,68",
    rates: Annotated[
        str, typer.Option(help="deaths per person-year at age 50, per site")
    ] = "0.02,0.03,0.015",
    names: Annotated[str, typer.Option(help="site names, comma-separated (default site1, site2, ...)")] = "",
    seed: Annotated[int, typer.Option(help="seed of the simulated survival times and site split")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace existing simulated files")] = False,
) -> None:
    """Write semi-synthetic site folders: real faces, Gompertz survival on age and sex (docs/site-data.md)."""
    n = [int(x) for x in _floats(sizes, "--sizes")]
    per_site = {"--mean-ages": _floats(mean_ages, "--mean-ages"), "--rates": _floats(rates, "--rates")}
    uneven = [f"{flag} has {len(v)}" for flag, v in per_site.items() if len(v) != len(n)]
    if uneven:
        raise _refused(
            ValueError(
                f"--sizes names {len(n)} site(s) but {' and '.join(uneven)} value(s); give one per site"
            )
        )
    site_names = names.split(",") if names else [f"site{i + 1}" for i in range(len(n))]
    try:
        params = SimulationParams(
            n_sites=len(n),
            site_sizes=tuple(n),
            site_mean_ages=per_site["--mean-ages"],
            site_baseline_rates=per_site["--rates"],
        )
        records = load_labelled_faces(faces or demo_faces_dir())
        written = simulate_sites(records, out, params, seed, site_names, overwrite)
    except (ValueError, OSError) as e:  # FaceLabelError is a ValueError listing every bad row
        raise _refused(e) from None
    for d in written:
        typer.echo(f"wrote {d}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="working folder for the demo")] = Path("demo-run"),
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 3,
    port: Annotated[int, typer.Option(help="SuperLink port on 127.0.0.1")] = 8000,
) -> None:
    """Server + three TLS-authenticated sites on 127.0.0.1: bundled cohort, DP training, reports."""
    from fahr_client.simulation import FederationSetup  # heavy (torch, Opacus): only the demo needs it

    started = time.monotonic()
    out = out.resolve()
    sites_dir = out / "sites"
    names = ["maastro", "boston", "leiden"]
    params = SimulationParams(site_sizes=(150, 120, 90))
    typer.echo(f"simulating {len(names)} sites from the bundled faces into {sites_dir}")
    simulate_sites(
        load_labelled_faces(demo_faces_dir()), sites_dir, params, seed=0, site_names=names, overwrite=True
    )
    shutil.rmtree(out / "certs", ignore_errors=True)
    security, connections = local_credentials(out / "certs", names, port)
    demo = FederationSetup()  # the settings benchmarks/privacy_utility.py measures
    for name in names:  # a fresh run: each site's ledger, caches and report start empty
        cfg = SiteConfig(
            connection=connections[name],
            name=name,
            data=Path("."),
            workdir=Path(SITE_WORKDIR),
            privacy=demo.privacy,
            train=demo.train,
        )
        dump_site_config(cfg, sites_dir / name / SITE_CONFIG_FILE)
        shutil.rmtree(sites_dir / name / SITE_WORKDIR, ignore_errors=True)
    server_toml = out / "server.toml"
    atomic_write_text(server_toml, demo_server_toml(rounds, len(names), port, security))
    shutil.rmtree(out / "server", ignore_errors=True)
    code = run_local_federation(
        server_toml, [sites_dir / n / SITE_CONFIG_FILE for n in names], echo=typer.echo
    )
    if code:
        raise typer.Exit(code)
    typer.echo(f"\ndemo finished in {time.monotonic() - started:.0f} s. Reports:")
    for name in names:
        report = load_site_config(sites_dir / name / SITE_CONFIG_FILE).paths.report_page
        typer.echo(f"  site {name}: {report}")
    typer.echo(f"  federation: {ServerWorkdir(out / 'server').report_page}")


if __name__ == "__main__":
    app()
