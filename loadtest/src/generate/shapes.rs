//! The shapes of the generated messages (Segment HTTP Tracking API), serialised from borrowed
//! structs, and the static catalogue they are filled from (pages, products, campaigns, user
//! agents, names, ...).

use serde::Serialize;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Base<'a> {
    pub(super) message_id: &'a str,
    pub(super) anonymous_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) user_id: Option<&'a str>,
    pub(super) timestamp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) sent_at: Option<&'a str>,
    pub(super) context: &'a Context<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Context<'a> {
    /// Segment defines no session field; sluice reads the SDK's session id from here.
    pub(super) session_id: &'a str,
    pub(super) page: &'a PageContext<'a>,
    pub(super) user_agent: &'a str,
    pub(super) locale: &'a str,
    pub(super) timezone: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) campaign: Option<&'a Campaign>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) library: Option<Library>,
}

#[derive(Serialize)]
pub(super) struct Library {
    pub(super) name: &'static str,
    pub(super) version: &'static str,
}

#[derive(Serialize)]
pub(super) struct PageContext<'a> {
    pub(super) path: &'a str,
    pub(super) title: &'a str,
    pub(super) url: &'a PageUrl<'a>,
    pub(super) referrer: &'a str,
    pub(super) search: &'a str,
}

/// The page URL, with the campaign's UTM query on a landing page.
pub(super) struct PageUrl<'a> {
    pub(super) path: &'a str,
    pub(super) campaign: Option<&'a Campaign>,
}

impl Serialize for PageUrl<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.campaign {
            Some(c) if !c.search.is_empty() => s.collect_str(&format_args!(
                "https://shop.example.com{}{}",
                self.path, c.search
            )),
            _ => s.collect_str(&format_args!("https://shop.example.com{}", self.path)),
        }
    }
}

#[derive(Serialize)]
pub(super) struct PageMsg<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) name: &'a str,
    pub(super) properties: &'a PageContext<'a>,
    #[serde(flatten)]
    pub(super) base: &'a Base<'a>,
}

#[derive(Serialize)]
pub(super) struct TrackMsg<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) event: &'static str,
    pub(super) properties: TrackProps<'a>,
    #[serde(flatten)]
    pub(super) base: &'a Base<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum TrackProps<'a> {
    Product(&'a Product),
    Button {
        button_id: &'static str,
        label: &'static str,
        location: &'a str,
    },
    SignUp {
        plan: &'static str,
        method: &'static str,
    },
    Order {
        order_id: &'a str,
        total: f64,
        currency: &'static str,
        products: [&'a Product; 2],
    },
}

#[derive(Serialize)]
pub(super) struct IdentifyMsg<'a> {
    #[serde(rename = "type")]
    pub(super) kind: &'static str,
    pub(super) traits: Traits<'a>,
    #[serde(flatten)]
    pub(super) base: &'a Base<'a>,
}

#[derive(Serialize)]
pub(super) struct Traits<'a> {
    pub(super) email: &'a str,
    pub(super) name: &'static str,
    pub(super) plan: &'static str,
    pub(super) company: &'static str,
    pub(super) logins: usize,
}

#[derive(Serialize)]
pub(super) struct Product {
    pub(super) product_id: &'static str,
    pub(super) sku: &'static str,
    pub(super) name: &'static str,
    pub(super) category: &'static str,
    pub(super) price: f64,
    pub(super) currency: &'static str,
}

#[derive(Serialize)]
pub(super) struct Campaign {
    #[serde(skip)]
    pub(super) referrer: &'static str,
    #[serde(skip)]
    pub(super) search: &'static str,
    pub(super) name: &'static str,
    pub(super) source: &'static str,
    pub(super) medium: &'static str,
}

// ---- the static catalogue ----

pub(super) const PAGES: &[(&str, &str)] = &[
    ("/", "Home"),
    ("/products", "All products"),
    ("/products/trail-runner-2", "Trail Runner 2 | Shoes"),
    ("/products/merino-tee", "Merino Tee | Shirts"),
    ("/cart", "Your cart"),
    ("/checkout", "Checkout"),
    (
        "/blog/how-to-choose-running-shoes",
        "How to choose running shoes",
    ),
    ("/pricing", "Pricing"),
    ("/signup", "Create your account"),
    ("/docs/getting-started", "Getting started"),
];

pub(super) const PRODUCTS: &[Product] = &[
    Product {
        product_id: "p_1001",
        sku: "TR2-BLK-42",
        name: "Trail Runner 2",
        category: "Shoes",
        price: 129.0,
        currency: "EUR",
    },
    Product {
        product_id: "p_1002",
        sku: "MT-NVY-M",
        name: "Merino Tee",
        category: "Shirts",
        price: 59.5,
        currency: "EUR",
    },
    Product {
        product_id: "p_1003",
        sku: "RJ-RED-L",
        name: "Rain Jacket",
        category: "Jackets",
        price: 189.0,
        currency: "EUR",
    },
    Product {
        product_id: "p_1004",
        sku: "SK-GRY-3",
        name: "Running Socks (3 pack)",
        category: "Socks",
        price: 19.9,
        currency: "EUR",
    },
];

pub(super) const CAMPAIGNS: &[Campaign] = &[
    Campaign {
        referrer: "https://www.google.com/",
        search: "",
        name: "organic",
        source: "google",
        medium: "organic",
    },
    Campaign {
        referrer: "https://www.google.com/",
        search: "?utm_source=google&utm_medium=cpc&utm_campaign=spring_sale&utm_term=running+shoes",
        name: "spring_sale",
        source: "google",
        medium: "cpc",
    },
    Campaign {
        referrer: "https://t.co/x1y2z3",
        search: "?utm_source=twitter&utm_medium=social&utm_campaign=launch",
        name: "launch",
        source: "twitter",
        medium: "social",
    },
    Campaign {
        referrer: "",
        search: "?utm_source=newsletter&utm_medium=email&utm_campaign=weekly_42&utm_content=hero",
        name: "weekly_42",
        source: "newsletter",
        medium: "email",
    },
    Campaign {
        referrer: "",
        search: "",
        name: "direct",
        source: "direct",
        medium: "none",
    },
];

pub(super) const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

pub(super) const LOCALES: &[&str] = &["en-US", "de-DE", "fr-FR", "en-GB", "nl-NL"];
pub(super) const TIMEZONES: &[&str] = &[
    "America/New_York",
    "Europe/Berlin",
    "Europe/Paris",
    "Europe/London",
    "Europe/Amsterdam",
];
pub(super) const NAMES: &[&str] = &[
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Edsger Dijkstra",
    "Barbara Liskov",
];
pub(super) const PLANS: &[&str] = &["free", "starter", "pro", "enterprise"];
pub(super) const COMPANIES: &[&str] = &["Acme GmbH", "Globex", "Initech", "Umbrella BV"];
pub(super) const METHODS: &[&str] = &["email", "google", "github"];
pub(super) const BUTTONS: &[(&str, &str)] = &[
    ("cta-hero", "Start free trial"),
    ("add-to-cart", "Add to cart"),
    ("newsletter", "Subscribe"),
];
