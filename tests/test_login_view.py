"""Login: against MIG_USERNAME/MIG_PASSWORD, locked out per user and address, CSRF, no secrets logged."""

import logging

import pytest
from django.test import Client
from django.urls import reverse

pytestmark = pytest.mark.django_db


def login(client, password, username="operator"):
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR="10.1.2.3")


def test_login_and_logout(client, operator):
    page = client.get(reverse("login"))
    assert "<title>Log in · MIG" in page.content.decode()
    response = login(client, "correct horse")
    assert response.status_code == 302 and response["Location"] == reverse("index")
    assert client.get(reverse("jobs")).status_code == 200
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("jobs")).status_code == 302


def test_wrong_password_is_refused_without_saying_which_part(client, operator):
    response = login(client, "wrong")
    assert response.status_code == 200
    assert "Please enter a correct username and password" in response.content.decode()


def test_repeated_failures_lock_the_user_out(client, operator, caplog):
    caplog.set_level(logging.DEBUG)
    for _ in range(4):
        assert login(client, "guess").status_code == 200
    locked = login(client, "guess")
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.content.decode()
    # Locked out even with the right password, for that user from that address...
    assert login(client, "correct horse").status_code == 429
    # ...but not for the same user elsewhere.
    elsewhere = Client().post(
        reverse("login"), {"username": "operator", "password": "correct horse"}, REMOTE_ADDR="10.9.9.9"
    )
    assert elsewhere.status_code == 302
    assert "guess" not in caplog.text and "correct horse" not in caplog.text


def test_csrf_is_required(operator):
    client = Client(enforce_csrf_checks=True)
    response = client.post(reverse("login"), {"username": "operator", "password": "correct horse"})
    assert response.status_code == 403


def test_login_is_required_by_default(client, db):
    # No MIG_USERNAME in the test environment: the login is the generated one.
    assert client.get(reverse("jobs"))["Location"].startswith(reverse("login"))
    assert client.get(reverse("index"))["Location"].startswith(reverse("login"))


def test_no_login_only_with_mig_no_login(client, settings):
    settings.MIG_NO_LOGIN = True
    assert client.get(reverse("login"))["Location"] == reverse("index")
    page = client.get(reverse("jobs"))
    assert page.status_code == 200
    assert "No login:" in page.content.decode() and 'role="alert"' in page.content.decode()


def test_banner_absent_with_login(logged_in):
    assert "No login:" not in logged_in.get(reverse("jobs")).content.decode()


def test_ping_is_public_and_cross_origin(client, operator):
    response = client.get(reverse("ping"))
    assert response.json() == {"ok": True}
    assert response["Access-Control-Allow-Origin"] == "*"


def test_behind_a_trusted_proxy_each_client_is_locked_out_alone(client, operator, settings):
    # Everyone comes through one proxy: keyed on its address, one guesser would lock the
    # operator out. The proxy's X-Forwarded-For names the client.
    settings.MIG_TRUSTED_PROXIES = ["10.0.0.1"]
    guesser = {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"}
    for _ in range(5):
        client.post(reverse("login"), {"username": "operator", "password": "guess"}, **guesser)
    locked = client.post(reverse("login"), {"username": "operator", "password": "guess"}, **guesser)
    assert locked.status_code == 429
    operator_behind_proxy = {"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "198.51.100.7, 10.0.0.1"}
    response = Client().post(
        reverse("login"), {"username": "operator", "password": "correct horse"}, **operator_behind_proxy
    )
    assert response.status_code == 302


def test_x_forwarded_for_from_anyone_else_is_ignored(client, operator, settings):
    # A guesser cannot escape the lockout by writing a new address into the header.
    settings.MIG_TRUSTED_PROXIES = ["10.0.0.1"]
    for n in range(5):
        client.post(
            reverse("login"),
            {"username": "operator", "password": "guess"},
            REMOTE_ADDR="203.0.113.9",
            HTTP_X_FORWARDED_FOR=f"192.0.2.{n}",
        )
    again = client.post(
        reverse("login"),
        {"username": "operator", "password": "correct horse"},
        REMOTE_ADDR="203.0.113.9",
        HTTP_X_FORWARDED_FOR="192.0.2.200",
    )
    assert again.status_code == 429
