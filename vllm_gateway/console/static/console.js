// The console's app: who is signed in, the navigation, the hash routes (#/overview, #/models/<id>,
// #/keys, #/usage, #/playground, #/requests) and each page's refresh loop, which polls every 5 s and
// pauses while the tab is hidden. A key without admin rights gets its own usage and the playground.

import { currentSession, signOut } from "./api.js";
import { keysPage } from "./keys.js";
import { modelPage } from "./model.js";
import { overviewPage } from "./overview.js";
import { playgroundPage } from "./playground.js";
import { requestsPage } from "./requests.js";
import { h, toSignIn } from "./ui.js";
import { usagePage } from "./usage.js";

const POLL_MS = 5000;

const PAGES = {
  overview: { title: "Overview", admin: true, render: overviewPage },
  models: { title: "Model", admin: true, render: modelPage, nav: "overview" },
  keys: { title: "Keys", admin: true, render: keysPage },
  usage: { title: "Usage", render: usagePage },
  requests: { title: "Requests", admin: true, render: requestsPage },
  playground: { title: "Playground", render: playgroundPage },
};
const ADMIN_NAV = [
  ["overview", "Overview"],
  ["keys", "Keys"],
  ["usage", "Usage"],
  ["requests", "Requests"],
  ["playground", "Playground"],
];
const USER_NAV = [
  ["usage", "My usage"],
  ["playground", "Playground"],
];

// One page's life: what it loads once, what it polls, and its errors, shown at its top.
class Page {
  constructor(main) {
    this.tasks = [];
    this.timer = 0;
    this.running = false;
    this.again = false;
    this.live = true;
    this.failures = new Map(); // task -> its last error, shown until it succeeds again
    this.error = h("div", { class: "page-error", role: "alert" });
    main.append(this.error);
  }

  once(task) {
    this.guard(task);
  }

  poll(task) {
    this.tasks.push(task);
    this.refreshNow();
  }

  refreshNow() {
    clearTimeout(this.timer);
    if (this.running) {
      this.again = true;
      return;
    }
    this.tick();
  }

  async tick() {
    if (!this.live || !this.tasks.length) return;
    this.running = true;
    for (const task of this.tasks) await this.guard(task);
    this.running = false;
    if (this.again) {
      this.again = false;
      this.tick();
    } else if (this.live && document.visibilityState === "visible") {
      this.timer = setTimeout(() => this.tick(), POLL_MS);
    }
  }

  async guard(task) {
    try {
      await task();
      this.failures.delete(task);
    } catch (error) {
      if (!this.live) return;
      this.failures.set(task, error.message); // the gateway's own words (403: "...needs an admin API key.")
    }
    this.error.replaceChildren(...[...new Set(this.failures.values())].map((text) => h("p", { text })));
  }

  visible(shown) {
    clearTimeout(this.timer);
    if (shown && !this.running) this.tick();
  }

  stop() {
    this.live = false;
    clearTimeout(this.timer);
  }
}

function route() {
  const [path] = window.location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/");
  return { name, argument: rest.map(decodeURIComponent).join("/") };
}

function start(session) {
  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const links = document.getElementById("nav-links");
  const menu = document.querySelector(".menu-button");
  const home = session.admin ? "overview" : "usage";
  const entries = session.admin ? ADMIN_NAV : USER_NAV;
  links.replaceChildren(...entries.map(([name, label]) => h("li", {}, h("a", { href: `#/${name}`, "data-page": name, text: label }))));
  document.getElementById("who").textContent = `${session.name}${session.admin ? " (admin)" : ""}`;
  document.querySelector(".brand").setAttribute("href", `#/${home}`);

  menu.addEventListener("click", () => {
    const open = nav.classList.toggle("open");
    menu.setAttribute("aria-expanded", String(open));
  });
  document.getElementById("sign-out").addEventListener("click", async () => {
    try {
      await signOut();
    } finally {
      toSignIn();
    }
  });

  let page = null;
  let first = true;
  function show() {
    if (!window.location.hash.startsWith("#/")) {
      if (first || window.location.hash === "") window.location.replace(`#/${home}`);
      return; // an in-page anchor such as the skip link's #main
    }
    const { name, argument } = route();
    const known = PAGES[name];
    if (!known) {
      window.location.replace(`#/${home}`);
      return;
    }
    page?.stop();
    main.replaceChildren();
    page = new Page(main);
    document.body.className = `console page-${name}${session.admin ? " admin" : " user"}`;
    document.title = `${known.title}${argument ? " " + argument : ""} · vLLM gateway console`;
    const current = known.nav || name;
    for (const link of links.querySelectorAll("a")) {
      if (link.dataset.page === current) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    nav.classList.remove("open");
    menu.setAttribute("aria-expanded", "false");
    known.render(main, page, name === "models" ? argument : session);
    if (!first) main.querySelector("h1")?.focus();
    first = false;
  }
  window.addEventListener("hashchange", show);
  document.addEventListener("visibilitychange", () => page?.visible(document.visibilityState === "visible"));
  show();
}

currentSession().then(
  (session) => (session ? start(session) : toSignIn()),
  (error) => {
    document.getElementById("main").replaceChildren(h("p", { class: "page-error", role: "alert", text: `The console could not start: ${error.message}` }));
  },
);
