"""grid.info parsing: typed grids, and errors naming the file, line, grid and key."""

import pytest

from migrations_app.grids import ConfigError, GridConfig, gridinfo

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
GOOD = f"""\
[grids.east]
driver = "hostgrid"
transport = "ssh"
host = "127.0.0.2"
port = 2222
user = "mig"
host_key = "{KEY}"
root = "/srv/grid"
app_url = "http://127.0.0.2:8080"

[grids.lab]
driver = "hostgrid"
transport = "local"
root = "/srv/lab"
"""


def test_parses_typed_grids_in_order():
    grids = gridinfo.parse(GOOD)
    assert list(grids) == ["east", "lab"]
    east = grids["east"]
    assert (east.host, east.port, east.user, east.root) == ("127.0.0.2", 2222, "mig", "/srv/grid")
    assert east.app_url == "http://127.0.0.2:8080/"
    assert east.address == "mig@127.0.0.2:2222" and east.app_host == "127.0.0.2"
    assert grids["lab"].address == "local" and grids["lab"].python == "python3"


PORTED = GOOD.replace(":8080", ":{port}").replace(
    'root = "/srv/grid"', 'root = "/srv/grid"\napp_ports = [8100, 8199]'
)


def test_a_grid_may_give_each_app_a_port_of_its_own():
    east = gridinfo.parse(PORTED)["east"]
    assert east.app_url == "http://127.0.0.2:{port}/" and east.app_ports == (8100, 8199)
    assert east.per_app_ports and east.app_host == "127.0.0.2"
    assert gridinfo.GridConfig.from_table("east", east.to_table()) == east


@pytest.mark.parametrize(
    "ports", ["[8199, 8100]", "[0, 10]", '"8100-8199"', "[8100]", "[8100, 8199.5]", "[true, 8199]"]
)
def test_app_ports_are_a_range_of_ports(ports):
    assert "key 'app_ports': must be" in error(PORTED.replace("[8100, 8199]", ports))


def test_table_round_trip():
    for grid in gridinfo.parse(GOOD).values():
        assert gridinfo.GridConfig.from_table(grid.name, grid.to_table()) == grid


def test_example_file_is_valid():
    assert set(gridinfo.load("conf/grid.info.example")) == {"east", "lab"}


def error(text):
    with pytest.raises(ConfigError) as e:
        gridinfo.parse(text, "/cfg/grid.info")
    return str(e.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('user = "mig"', 'usr = "mig"'), "line 6: grid 'east', key 'usr': unknown key"),
        (('root = "/srv/grid"\n', ""), "line 1: grid 'east', key 'root': is required"),
        (("port = 2222", "port = 70000"), "line 5: grid 'east', key 'port': must be from 1 to 65535"),
        (("port = 2222", 'port = "22"'), "grid 'east', key 'port': must be a number"),
        (("port = 2222", "port = 22.5"), "grid 'east', key 'port': must be a whole number"),
        (('driver = "hostgrid"', 'driver = "vmware"'), "grid 'east', key 'driver': unknown driver 'vmware'"),
        (('driver = "hostgrid"', 'driver = "libvirt"'), "driver 'libvirt' is not available yet"),
        (('driver = "hostgrid"', 'driver = "docker"'), "key 'root': does not apply to a docker grid"),
        (('root = "/srv/grid"', 'root = "/srv/grid"\nimage = "mig:1"'), "key 'image': only applies to"),
        (('transport = "ssh"', 'transport = "telnet"'), "key 'transport': unknown transport 'telnet'"),
        ((f'host_key = "{KEY}"\n', ""), "key 'host_key': is required for an ssh grid (MIG never trusts"),
        ((KEY, "AAAA"), "key 'host_key': must look like 'ssh-ed25519 AAAA...'"),
        ((KEY, "ssh-ed25519 !!notbase64"), "key 'host_key': the key is not valid base64"),
        ((KEY, KEY.replace("ssh-ed25519", "ssh-rsa")), "key 'host_key': the key data is not a ssh-rsa key"),
        (('root = "/srv/grid"', 'root = "srv"'), "key 'root': must be an absolute path"),
        (('root = "/srv/grid"', 'root = "/srv/../etc"'), "key 'root': must be a normalised path"),
        (('app_url = "http://127.0.0.2:8080"', 'app_url = "ftp://x"'), "key 'app_url': must be an http://"),
        (('host = "127.0.0.2"', 'host = "a b; rm"'), "key 'host': is not a host name or address"),
        (("[grids.east]", "[grids.1east]"), "grid '1east': grid names use letters"),
        (('host = "127.0.0.2"', 'host = "-oProxyCommand"'), "key 'host': must not begin with '-'"),
        (('host = "127.0.0.2"', 'host = "-V"'), "key 'host': must not begin with '-'"),
        (('root = "/srv/lab"', 'root = "/srv/lab"\nport = 22'), "grid 'lab', key 'port': only applies to"),
        ((":8080", ":{port}"), "key 'app_ports': is required when app_url has {port}: [LOW, HIGH]"),
        (
            ('root = "/srv/grid"', 'root = "/srv/grid"\napp_ports = [1, 2]'),
            "app_ports': needs an app_url with {port}",
        ),
        ((":8080", ":{port}/{app}"), "key 'app_url': may hold one placeholder, {port}"),
        (("127.0.0.2:8080", "{port}.example:80"), "key 'app_url': has {port} where the port goes"),
    ],
)
def test_errors_name_file_line_grid_and_key(change, message):
    text = GOOD.replace(*change)
    assert text != GOOD
    got = error(text)
    assert got.startswith("/cfg/grid.info: ")
    assert message in got


def test_a_huge_name_is_not_echoed_in_full():
    got = error(GOOD.replace("[grids.east]", f"[grids.{'e' * 1_000_000}]"))
    assert "grid names use letters" in got and "…" in got
    assert len(got) < 300


def test_syntax_error_has_line():
    assert "line 3" in error('[grids.east]\ndriver = "hostgrid"\nroot = \n')


def test_top_level_keys_refused():
    assert "unknown top-level key 'east'" in error('east = "x"\n')


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="grid.info not found"):
        gridinfo.load(tmp_path / "grid.info")
    (tmp_path / "bin.info").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read grid.info"):
        gridinfo.load(tmp_path / "bin.info")


DOCKER = """
[grids.east]
driver = "docker"
transport = "ssh"
host = "127.0.0.2"
host_key = "KEY"
image = "mig:1.0"
docker_socket = "/run/docker.sock"
app_url = "http://127.0.0.2:{port}/"
app_ports = [8100, 8199]

[grids.lab]
driver = "docker"
transport = "local"
image = "registry.example/mig@sha256:0123"
""".replace("KEY", KEY)


def test_a_docker_grid_names_its_image_and_engine():
    grids = gridinfo.parse(DOCKER)
    east, lab = grids["east"], grids["lab"]
    assert (east.driver, east.image, east.docker_socket) == ("docker", "mig:1.0", "/run/docker.sock")
    assert east.root == "/grid"  # where the grid's own containers have its volume
    assert lab.docker_socket == "/var/run/docker.sock"  # docker's own, unless told
    # What travels to the helper is read back as strictly.
    assert GridConfig.from_table("east", east.to_table()) == east
    assert "root" not in east.to_table()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('image = "mig:1.0"\n', ""), "key 'image': is required for a docker grid"),
        (('image = "mig:1.0"', 'image = "mig 1; rm"'), "key 'image': is not an image reference"),
        (('"/run/docker.sock"', '"run/docker.sock"'), "key 'docker_socket': must be an absolute path"),
        (('image = "mig:1.0"', 'image = "mig:1.0"\nroot = "/srv"'), "key 'root': does not apply to a docker"),
        (('image = "mig:1.0"', 'image = "mig:1.0"\nrestricted = true'), "key 'restricted': is for hostgrid"),
    ],
)
def test_docker_grid_errors(change, message):
    text = DOCKER.replace(*change, 1)
    assert text != DOCKER
    assert message in error(text)
