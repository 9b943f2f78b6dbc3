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
GREETINGS = ("Hi!", "Hello.", "Hey.", "Good morning!", "Good evening.", "Hi there!", "")
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
    return " ".join(part for part in (greeting, body, thanks) if part)


def order_status(rng: random.Random) -> Chat:
    order, date, model, days = _order(rng), _date(rng), rng.choice(MODELS), rng.randint(2, 6)
    track = (f"Order {order} has shipped and is with the carrier. You can follow it under "
             f"Account > Orders > {order} > Track; it should arrive within {days} business days.")
    return rng.choice((
        (f"Where is my order {order}? I bought a {model} on {date}.", track),
        (f"Can you tell me the status of order {order}?", track),
        (f"My {model} (order {order}, placed {date}) still hasn't arrived.",
         f"{track} If it has not arrived by then, reply here and we will open a carrier trace."),
        (f"Can I change the delivery address of order {order}?",
         f"Order {order} can be changed until it ships: go to Account > Orders > {order} > Edit "
         f"address. Once it has shipped, the carrier's tracking page lets you redirect it."),
    ))


def refund(rng: random.Random) -> Chat:
    order, amount, model = _order(rng), _amount(rng), rng.choice(MODELS)
    reason = rng.choice(("it flickers", "the colour is wrong", "I changed my mind",
                         "it arrived scratched", "the dimmer does not work"))
    steps = (f"You can return order {order} within 30 days of delivery: go to Account > Orders > "
             f"{order} > Return item, print the prepaid label and drop the parcel at any post "
             f"office.")
    money = "The refund goes back to your original payment method within 5 to 7 business days."
    return rng.choice((
        (f"I want a refund for my {model}, {reason}. Order {order}.", f"{steps} {money}"),
        (f"How do I return order {order}? {reason[0].upper()}{reason[1:]}.", steps),
        (f"I sent back order {order} last week. When do I get my {amount} EUR back?",
         f"Once the parcel for order {order} reaches our warehouse, we refund {amount} EUR. "
         f"{money}"),
    ))


def shipping(rng: random.Random) -> Chat:
    country, days = rng.choice(sorted(COUNTRIES.items()))
    model = rng.choice(MODELS)
    return rng.choice((
        (f"Do you ship the {model} to {country}?",
         f"Yes, we ship the {model} to {country}. Standard delivery takes about {days} business "
         f"days."),
        (f"How long does delivery to {country} take?",
         f"Standard delivery to {country} takes about {days} business days; express delivery, "
         f"chosen at checkout, usually halves that."),
        (f"What are the shipping costs to {country}?",
         f"Shipping to {country} is free on orders over 50 EUR; below that it costs 4.90 EUR. "
         f"Express delivery costs 9.90 EUR."),
    ))


def password(rng: random.Random) -> Chat:
    minutes = rng.choice((15, 30, 60))
    reset = ("In the Lumo app, tap Sign in > Forgot password and enter your account email. "
             "The reset link is valid for one hour.")
    return rng.choice((
        ("I forgot my password and can't log in to the Lumo app.", reset),
        ("The password reset email never arrives.",
         "Reset emails come from no-reply@lumo-home.example and can take a few minutes. Please "
         "check your spam folder and that you typed the email of your account, then request a "
         "new link; each link is valid for one hour."),
        ("How do I change my account password?",
         "While signed in, open Settings > Account > Password, enter your current password and "
         "then the new one twice. Other devices are signed out when the password changes."),
        ("My account is locked after too many login attempts.",
         f"After five failed attempts the account locks for {minutes} minutes. Wait until then "
         f"and sign in again, or reset the password now: {reset}"),
    ))


def billing(rng: random.Random) -> Chat:
    amount, date, order = _amount(rng), _date(rng), _order(rng)
    invoice = f"A PDF invoice for order {order} is under Account > Orders > {order} > Invoice."
    return rng.choice((
        (f"I was charged {amount} EUR twice on {date} for order {order}.",
         f"The second {amount} EUR line for order {order} is a card authorisation hold, not a "
         f"charge; your bank releases it within 3 business days."),
        (f"Can I get an invoice for order {order}?", invoice),
        (f"I need a company invoice with our VAT number for order {order}.",
         f"{invoice} Add your VAT number under Account > Billing details first, then download "
         f"the invoice again and it will include it."),
        ("Which payment methods do you accept?",
         "We accept Visa, Mastercard, American Express, PayPal and bank transfer. Bank "
         "transfers ship once the payment arrives, usually after 1 to 2 business days."),
    ))


def subscription(rng: random.Random) -> Chat:
    plan, price = rng.choice((("Lumo Plus", "2.99"), ("Lumo Family", "4.99")))
    return rng.choice((
        (f"How do I cancel my {plan} subscription?",
         f"Open the app and go to Settings > Subscription > Cancel. You keep {plan} until the "
         f"end of the current billing month."),
        (f"Will I be charged again if I cancel {plan} today?",
         f"No. After you cancel, {plan} stays active until the end of the current billing "
         f"month and you are not charged again."),
        (f"What does {plan} cost per month?", f"{plan} costs {price} EUR per month and can be "
         f"cancelled at any time."),
    ))


def setup(rng: random.Random) -> Chat:
    model = rng.choice(MODELS)
    problem = rng.choice(("won't connect to my Wi-Fi", "is not found by the app",
                          "keeps dropping off the network", "does not show up after a router change"))
    return (f"My {model} {problem}.",
            f"Hold the power button of the {model} for 10 seconds until the light blinks blue "
            f"to put it in pairing mode. Then tap Add device in the app and pick your 2.4 GHz "
            f"Wi-Fi network ({PRODUCT} lamps do not support 5 GHz).")


def warranty(rng: random.Random) -> Chat:
    model, date, year = rng.choice(MODELS), _date(rng), rng.randint(2021, 2024)
    answer = (f"Every {model} has a two-year warranty from the delivery date. If yours was "
              f"delivered less than two years ago, send us the order number and a short video "
              f"of the fault and we will ship a replacement.")
    return rng.choice((
        (f"My {model} bought on {date}, {year} stopped working. Is it under warranty?", answer),
        (f"The light of my {model} died. I bought it in {year}.", answer),
    ))


def account(rng: random.Random) -> Chat:
    return rng.choice((
        ("How do I change the email address on my account?",
         "Open Settings > Account > Email in the app, enter the new address and confirm it "
         "with the link we send there."),
        ("Please delete my account and all my data.",
         "You can delete the account under Settings > Account > Delete account. Your data is "
         "removed within 30 days and this cannot be undone."),
        ("Can two people share one Lumo account?",
         "Rather than sharing a login, invite others with Settings > Home > Invite: each person "
         "keeps their own account and controls the same lamps."),
    ))


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
