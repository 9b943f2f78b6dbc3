"""Synthetic customer-support chats for a fictional product, in chat format.

    python tools/make_support_data.py OUT_DIR [--n 400] [--seed 0] [--eval-fraction 0.1]

Writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl, one conversation per line:
    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}],
     "domain": "support"}

The product is "Lumo", a made-up smart desk lamp sold by the made-up shop Lumo Home. Every
conversation is drawn from a topic template (orders, refunds, shipping, passwords, billing,
subscriptions, device setup, warranty, account), with random slots (order numbers, dates,
amounts, countries, greetings) filled in so that the answer is consistent with the question.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

PRODUCT = "Lumo"
SHOP = "Lumo Home"
MODELS = ("Lumo Mini", "Lumo Desk", "Lumo Pro", "Lumo Arc")
COUNTRIES = {"Germany": 5, "France": 6, "Canada": 7, "Japan": 9, "Australia": 10, "Brazil": 12,
             "the United Kingdom": 4, "Spain": 6, "the United States": 3, "Norway": 6}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
GREETINGS = ("Hi", "Hello", "Hey", "Good morning", "Good evening", "Hi there", "")
THANKS = ("Thanks!", "Thank you.", "Thanks in advance.", "Any help is appreciated.", "")
OPENERS = ("Thanks for reaching out.", "Happy to help.", "Sorry for the trouble.",
           "Thanks for your message.", "I can help with that.")

Chat = tuple[str, str]


def _order(rng: random.Random) -> str:
    return f"LH-{rng.randint(100000, 999999)}"


def _date(rng: random.Random) -> str:
    return f"{MONTHS[rng.randrange(12)]} {rng.randint(1, 28)}"


def _amount(rng: random.Random) -> str:
    return f"{rng.choice((29, 39, 49, 59, 79, 99, 129, 149))}.{rng.choice(('00', '50', '99'))}"


def _wrap(rng: random.Random, body: str) -> str:
    """Add an optional greeting and sign-off so the same request reads in several ways."""
    greeting = rng.choice(GREETINGS)
    thanks = rng.choice(THANKS)
    return " ".join(part for part in (f"{greeting}," if greeting else "", body, thanks) if part)


def order_status(rng: random.Random) -> Chat:
    order, date, model = _order(rng), _date(rng), rng.choice(MODELS)
    ask = rng.choice((f"Where is my order {order}? I bought a {model} on {date}.",
                      f"My {model} (order {order}, placed {date}) still hasn't arrived.",
                      f"Can you tell me the status of order {order}?"))
    days = rng.randint(2, 6)
    answer = (f"Order {order} has shipped and is with the carrier. You can follow it from "
              f"Account > Orders > {order} > Track. It should arrive within {days} business days; "
              f"if it has not arrived by then, reply here and we will open a carrier trace.")
    return ask, answer


def refund(rng: random.Random) -> Chat:
    order, amount, model = _order(rng), _amount(rng), rng.choice(MODELS)
    reason = rng.choice(("it flickers", "the colour is wrong", "I changed my mind",
                         "it arrived scratched", "the dimmer does not work"))
    ask = rng.choice((f"I want a refund for my {model}, {reason}. Order {order}.",
                      f"How do I return order {order}? {reason.capitalize()}.",
                      f"Can I get my {amount} EUR back for order {order}? {reason.capitalize()}."))
    answer = (f"You can return order {order} within 30 days of delivery. Go to Account > Orders > "
              f"{order} > Return item, print the prepaid label and drop the parcel at any post "
              f"office. Once it reaches our warehouse, the refund goes back to your original "
              f"payment method within 5 to 7 business days.")
    return ask, answer


def shipping(rng: random.Random) -> Chat:
    country, days = rng.choice(sorted(COUNTRIES.items()))
    model = rng.choice(MODELS)
    ask = rng.choice((f"Do you ship the {model} to {country}?",
                      f"How long does delivery to {country} take?",
                      f"What are the shipping costs to {country}?"))
    answer = (f"Yes, we ship to {country}. Standard delivery takes about {days} business days and "
              f"is free on orders over 50 EUR; below that it costs 4.90 EUR. Express delivery "
              f"is available at checkout and usually halves the delivery time.")
    return ask, answer


def password(rng: random.Random) -> Chat:
    ask = rng.choice(("I forgot my password and can't log in to the Lumo app.",
                      "The password reset email never arrives.",
                      "How do I change my account password?",
                      "My account is locked after too many login attempts."))
    minutes = rng.choice((15, 30, 60))
    answer = ("Open the Lumo app, tap Sign in > Forgot password and enter your account email. "
              "The reset link is valid for one hour; check your spam folder if it does not show "
              f"up. After five failed attempts the account locks for {minutes} minutes, then you "
              "can try again.")
    return ask, answer


def billing(rng: random.Random) -> Chat:
    amount, date, order = _amount(rng), _date(rng), _order(rng)
    ask = rng.choice((f"I was charged {amount} EUR twice on {date} for order {order}.",
                      f"Can I get an invoice for order {order}?",
                      f"Why is there a charge of {amount} EUR from {SHOP} on my card?"))
    answer = (f"I checked order {order}: the second {amount} EUR line is a card authorisation "
              f"hold, not a charge, and your bank releases it within 3 business days. A PDF "
              f"invoice is under Account > Orders > {order} > Invoice.")
    return ask, answer


def subscription(rng: random.Random) -> Chat:
    plan, price = rng.choice((("Lumo Plus", "2.99"), ("Lumo Family", "4.99")))
    ask = rng.choice((f"How do I cancel my {plan} subscription?",
                      f"Will I be charged again if I cancel {plan} today?",
                      f"What does {plan} cost per month?"))
    answer = (f"{plan} costs {price} EUR per month. You can cancel any time in the app under "
              f"Settings > Subscription > Cancel; you keep the features until the end of the "
              f"current billing month and are not charged again.")
    return ask, answer


def setup(rng: random.Random) -> Chat:
    model = rng.choice(MODELS)
    problem = rng.choice(("won't connect to my Wi-Fi", "is not found by the app",
                          "keeps dropping off the network", "does not show up after a router change"))
    ask = f"My {model} {problem}."
    answer = (f"Please hold the power button of the {model} for 10 seconds until the light "
              f"blinks blue, which puts it in pairing mode. Then open the app, tap Add device "
              f"and pick your 2.4 GHz Wi-Fi network ({PRODUCT} lamps do not support 5 GHz). "
              f"Keep the phone within a few metres of the lamp while it pairs.")
    return ask, answer


def warranty(rng: random.Random) -> Chat:
    model, date = rng.choice(MODELS), _date(rng)
    year = rng.randint(2021, 2024)
    ask = rng.choice((f"My {model} bought on {date}, {year} stopped working. Is it under warranty?",
                      f"The light of my {model} died. I bought it in {year}."))
    answer = (f"Every {model} has a two-year warranty from the delivery date. If yours was "
              f"delivered less than two years ago, send us the order number and a short video "
              f"of the fault and we will ship a replacement before you return the old lamp.")
    return ask, answer


def account(rng: random.Random) -> Chat:
    ask = rng.choice(("How do I change the email address on my account?",
                      "Please delete my account and all my data.",
                      "Can two people share one Lumo account?"))
    answer = ("Email changes and account deletion are under Settings > Account in the app. "
              "Deletion removes your data within 30 days and cannot be undone. For a household, "
              "invite others with Settings > Home > Invite instead of sharing a login.")
    return ask, answer


TOPICS: tuple[Callable[[random.Random], Chat], ...] = (
    order_status, refund, shipping, password, billing, subscription, setup, warranty, account)


def make_conversation(rng: random.Random) -> dict:
    """One {"messages": [...], "domain": "support"} record."""
    ask, answer = rng.choice(TOPICS)(rng)
    return {"messages": [{"role": "user", "content": _wrap(rng, ask)},
                         {"role": "assistant", "content": f"{rng.choice(OPENERS)} {answer}"}],
            "domain": "support"}


def make_dataset(n: int, seed: int, eval_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """n distinct conversations (distinct user turns), split into (train, eval) by position
    after a seeded shuffle; eval gets round(n * eval_fraction), at least one."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"could not draw {n} distinct conversations; lower --n")
        record = make_conversation(rng)
        key = record["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            records.append(record)
    rng.shuffle(records)
    n_eval = max(1, round(n * eval_fraction))
    return records[n_eval:], records[:n_eval]


def write_dataset(out_dir: Path, n: int = 400, seed: int = 0, eval_fraction: float = 0.1) -> None:
    """Write OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl."""
    train, evals = make_dataset(n, seed, eval_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", evals)):
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Synthetic customer-support chats (chat format).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n", type=int, default=400, help="number of conversations in total")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    write_dataset(args.out_dir, args.n, args.seed, args.eval_fraction)
    print(f"wrote {args.out_dir}/train.jsonl and eval.jsonl ({args.n} conversations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
